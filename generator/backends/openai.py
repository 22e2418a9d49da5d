"""Any OpenAI-compatible chat server (vLLM, TGI, llama.cpp server, OpenAI itself), streamed over SSE."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from generator.backends.base import Backend, Delta, Finished, FinishReason, GenerationParams, register
from fabric.errors import FailedPrecondition, InvalidArgument, Overloaded, RagloomError, Unavailable

if TYPE_CHECKING:
    from generator.server import Settings

log = logging.getLogger(__name__)

#: Concurrent upstream requests; more wait up to the pool timeout, then get RESOURCE_EXHAUSTED.
MAX_CONNECTIONS = 64


@register("openai")
class OpenAIBackend(Backend):
    def __init__(
        self,
        base_url: str,
        model: str = "",
        *,
        api_key: str = "",
        context_tokens: int = 0,
        request_timeout_s: float = 120.0,
        queue_timeout_s: float = 30.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.context_tokens = context_tokens
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # read: the longest silence between two chunks; pool: the longest wait for a free connection.
        self._timeout = httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s), pool=queue_timeout_s)
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIBackend:
        return cls(
            settings.openai_base_url,
            settings.openai_model,
            api_key=settings.openai_api_key,
            context_tokens=settings.context_tokens,
            request_timeout_s=settings.request_timeout_s,
            queue_timeout_s=settings.queue_timeout_s,
        )

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def info(self) -> tuple[str, int]:
        return self.model or "(server default)", self.context_tokens

    def _payload(self, params: GenerationParams) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in params.messages],
            "max_tokens": params.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        optional = {
            "model": self.model or None,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(params.stop) or None,
            "seed": params.seed,
        }
        payload.update((key, value) for key, value in optional.items() if value is not None)
        return payload

    async def stream(self, params: GenerationParams) -> AsyncIterator[Delta | Finished]:
        if self._client is None:
            raise Unavailable("the openai backend is not started")
        finish_reason: FinishReason | None = None
        usage: dict[str, Any] = {}
        chunks = 0
        try:
            # Leaving this block early (the caller cancelled) closes the response and its connection.
            async with self._client.stream("POST", "/chat/completions", json=self._payload(params)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _upstream_error(response)
                async for event in _sse_events(response):
                    if "error" in event:
                        raise Unavailable(f"upstream failed mid-stream: {_error_message(event)}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            chunks += 1
                            yield Delta(text)
                        if choice.get("finish_reason"):
                            finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
        except httpx.PoolTimeout:
            raise Overloaded("too many generations in flight to the upstream server; retry later") from None
        except httpx.TimeoutException as exc:
            raise Unavailable(f"upstream {self.base_url} timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"upstream {self.base_url} unreachable: {type(exc).__name__}: {exc}") from None
        if finish_reason is None:
            raise Unavailable("upstream ended the stream before the reply finished")
        yield Finished(
            finish_reason,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            # Servers that ignore include_usage: count the chunks, one token each in practice.
            completion_tokens=int(usage.get("completion_tokens") or chunks),
        )


async def _sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of the `data:` lines of a server-sent event stream, up to `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (": keep-alive"), event/id fields
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            raise Unavailable(f"upstream sent a malformed event: {data[:200]!r}") from None


def _upstream_error(response: httpx.Response) -> RagloomError:
    status = response.status_code
    message = f"upstream HTTP {status}: {_error_message(_json_or_text(response))}"
    if status == 429:
        return Overloaded(message, retry_after_s=_retry_after(response))
    if status >= 500 or status == 408:  # the server's fault, or it gave up waiting: retrying may succeed
        return Unavailable(message)
    if status in (400, 413, 422):  # the request itself: bad parameters, too long a prompt
        return InvalidArgument("messages", message)
    return FailedPrecondition(message)  # auth, unknown model or route: the deployment's configuration


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _error_message(body: Any) -> str:
    """The human part of an error body: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the text."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            found = error.get("message") or error.get("detail")
            if found:
                return str(found)[:500]
        elif isinstance(error, str):
            return error[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return str(body).strip()[:500] or "no details"


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return 1.0

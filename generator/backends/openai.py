"""Any OpenAI-compatible chat server (vLLM, TGI, llama.cpp server, OpenAI itself), streamed over SSE.

httpx is imported when the backend starts, so that the service settings can read `OpenAIOptions` cheaply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from generator.backends.base import Backend, CommonOptions, Delta, Finished, FinishReason, GenerationParams
from fabric.errors import FailedPrecondition, InvalidArgument, Overloaded, RagloomError, Unavailable
from fabric.settings import option

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: Concurrent upstream requests; more wait up to the pool timeout, then get RESOURCE_EXHAUSTED.
MAX_CONNECTIONS = 64


@dataclass
class OpenAIOptions:
    """The openai backend's own settings."""

    base_url: str = option("http://127.0.0.1:8000/v1", "openai: server URL up to and including /v1")
    model: str = option("", "openai: model name to request; empty = the server's default")
    api_key: str = option("", "openai: bearer token, if the server wants one")
    request_timeout_s: float = option(120.0, "openai: longest wait for the upstream server's next bytes")

    def validate(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError("openai: request_timeout_s must be positive")


class OpenAIBackend(Backend):
    name = "openai"
    Options = OpenAIOptions

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
        self.request_timeout_s = request_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def create(cls, common: CommonOptions, options: OpenAIOptions) -> OpenAIBackend:
        return cls(
            options.base_url,
            options.model,
            api_key=options.api_key,
            context_tokens=common.context_tokens,
            request_timeout_s=options.request_timeout_s,
            queue_timeout_s=common.queue_timeout_s,
        )

    async def start(self) -> None:
        import httpx

        # read: the longest silence between two chunks; pool: the longest wait for a free connection.
        timeout = httpx.Timeout(
            self.request_timeout_s, connect=min(10.0, self.request_timeout_s), pool=self.queue_timeout_s
        )
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout,
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
        import httpx  # loaded by start: only its exceptions are needed here

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
                        raise Unavailable(f"upstream {self.base_url} failed mid-stream: {_error_message(event)}")
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
            raise Unavailable(f"upstream {self.base_url} ended the stream before the reply finished")
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
            raise Unavailable(f"upstream {response.request.url} sent a malformed event: {data[:200]!r}") from None


def _upstream_error(response: httpx.Response) -> RagloomError:
    status = response.status_code
    message = f"upstream {response.request.url} HTTP {status}: {_error_message(_json_or_text(response))}"
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

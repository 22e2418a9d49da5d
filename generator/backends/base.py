"""Domain types of a generation, the Backend interface, and the registry that picks a backend by name.

The registry is lazy, as vLLM's: it maps each name to ``"module:Class"`` and imports a backend's
module only when that backend is created, so choosing one never loads another's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from fabric.errors import Overloaded, Unimplemented
from fabric.shedding import Ewma, expected_finish_s, refuse_if_late

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """One request: the conversation and how to sample the reply (None = the backend's default)."""

    messages: list[ChatMessage]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    """Text produced since the previous item."""

    text: str


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Finished:
    """The last item of a stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Likelihoods:
    """What `Backend.score` found: per context, in request order, the mean natural-log probability of the
    continuation's tokens after it; the continuation's length and all the tokens read, in tokens."""

    mean_logprob: list[float]
    continuation_tokens: int
    tokens: int


@dataclass(frozen=True)
class CommonOptions:
    """What the service tells every backend; the rest of a backend's configuration is its own `Options`."""

    #: The model to load: a file or folder for in-process backends, unused by a remote one; "" = the backend's default.
    model_path: str = ""
    #: Context window in tokens (prompt + reply).
    context_tokens: int = 2048
    #: Seconds a request may wait for the model before RESOURCE_EXHAUSTED.
    queue_timeout_s: float = 30.0


#: Seconds the current request waited for its slot (set by Slots.take in the request's own task).
SLOT_WAIT: contextvars.ContextVar[float] = contextvars.ContextVar("slot_wait", default=0.0)


class Slots:
    """The generations a backend runs at once, and the door in front of them.

    Each slot is one sequence the model decodes (a llama.cpp context, an in-flight request of a
    batching engine). How long a generation holds its slot is measured (an exponentially weighted
    mean), so the wait a new request faces is known from the queue: ahead of it are the waiting
    ones, served `n` at a time. `check` refuses at once a request that would not finish within the
    caller's remaining time — shedding it at the door costs nothing, while serving it late costs a
    whole generation nobody reads. A request past the door waits at most `queue_timeout_s` for a slot.
    """

    def __init__(self, n: int, queue_timeout_s: float = 30.0, weight: float = 0.3):
        if n < 1:
            raise ValueError("a backend needs at least one slot")
        self.n, self.queue_timeout_s = n, queue_timeout_s
        self._free = asyncio.Semaphore(n)
        self.running = 0
        self.waiting = 0
        #: Mean seconds a generation holds its slot (None until one has finished).
        self.service = Ewma(weight)

    def expected_s(self) -> float | None:
        """Seconds until a request arriving now would finish: its wait for a slot plus its own service."""
        return expected_finish_s(self.running + self.waiting, self.n, self.service.value)

    def check(self, remaining_s: float | None) -> None:
        """RESOURCE_EXHAUSTED now, with a retry hint, when the request would miss the caller's deadline."""
        refuse_if_late(self.expected_s(), remaining_s,
                       f"the generator is busy, {self.running} running and {self.waiting} waiting")

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """One slot for the block (waiting at most queue_timeout_s); its holding time feeds the estimate."""
        taken = await self.take()
        try:
            yield
        finally:
            self.give(taken)

    async def take(self) -> float:
        """A slot held beyond one block (released with `give(started)`): returns when it was taken."""
        asked = time.perf_counter()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._free.acquire(), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise Overloaded(f"the model stayed busy for {self.queue_timeout_s:g}s; retry later",
                             retry_after_s=1.0) from None
        finally:
            self.waiting -= 1
        self.running += 1
        taken = time.perf_counter()
        SLOT_WAIT.set(taken - asked)
        return taken

    def give(self, taken: float) -> None:
        self.running -= 1
        self._free.release()
        self.record(time.perf_counter() - taken)

    def record(self, held_s: float) -> None:
        self.service.add(held_s)

    @property
    def service_s(self) -> float | None:
        return self.service.value


class Backend(ABC):
    """Turns a conversation into a stream of text. Implementations must not block the event loop."""

    #: The generations it runs at once, with the door that sheds what would finish too late; None where
    #: another server queues them (an OpenAI-compatible one: its own admission decides).
    slots: Slots | None = None

    #: Registry name (its key in BACKENDS), reported by Info.
    name: ClassVar[str] = ""
    #: The backend's own options: a dataclass of `fabric.settings.option` fields, the service settings' group for it.
    Options: ClassVar[type]

    @classmethod
    @abstractmethod
    def create(cls, common: CommonOptions, options: Any) -> Backend:
        """The backend configured by the shared options and its own (an instance of `cls.Options`)."""

    @abstractmethod
    async def start(self) -> None:
        """Loads the model or opens connections; called once before the first `stream`."""

    @abstractmethod
    async def close(self) -> None:
        """Releases what `start` acquired."""

    @abstractmethod
    def info(self) -> tuple[str, int]:
        """(model name or file, context window in tokens)."""

    @abstractmethod
    def stream(self, params: GenerationParams) -> AsyncIterator[Delta | Finished]:
        """Yields Delta items as text is produced, then one Finished.

        Closing the iterator early (the caller went away) must stop the work promptly.
        """

    async def score(self, contexts: list[str], continuation: str) -> Likelihoods:
        """How likely the model finds `continuation` after each of `contexts` (see likelihood.py); a
        backend that cannot read its model's probabilities says so (UNIMPLEMENTED)."""
        raise Unimplemented(f"the {self.name} backend cannot score text")


#: Every backend: name → "module:Class". Only the chosen one's module is imported.
BACKENDS: dict[str, str] = {
    "llama_cpp": "generator.backends.llama_cpp:LlamaCppBackend",
    "openai": "generator.backends.openai:OpenAIBackend",
    "tensorrt_llm": "generator.backends.tensorrt_llm:TensorRTLLMBackend",
}


def known_backends() -> list[str]:
    """The backends' names, without importing any of them."""
    return sorted(BACKENDS)


def backend_class(name: str) -> type[Backend]:
    """The class of the backend called `name`, its module imported now."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown generator backend {name!r}; known: {', '.join(known_backends())}") from None
    module, _, qualname = target.partition(":")
    return getattr(importlib.import_module(module), qualname)


def create_backend(name: str, common: CommonOptions | None = None, options: Any = None) -> Backend:
    """The backend called `name`, from the shared options and its own (None = the defaults of both)."""
    cls = backend_class(name)
    if options is None:
        options = cls.Options()
    elif not isinstance(options, cls.Options):
        raise TypeError(f"the {name} backend takes {cls.Options.__name__}, got {type(options).__name__}")
    return cls.create(common or CommonOptions(), options)

"""Domain types of a generation, the Backend interface, and the registry that picks a backend by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from generator.server import Settings

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


class Backend(ABC):
    """Turns a conversation into a stream of text. Implementations must not block the event loop."""

    #: Registry name, set by `register`.
    name: str = ""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Backend:
        """The backend configured by the service settings."""

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


_B = TypeVar("_B", bound=type[Backend])
_REGISTRY: dict[str, type[Backend]] = {}


def register(name: str) -> Callable[[_B], _B]:
    """Class decorator that makes a backend available to `create_backend` under `name`."""

    def decorate(cls: _B) -> _B:
        if name in _REGISTRY:
            raise ValueError(f"generator backend {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def known_backends() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, settings: Settings) -> Backend:
    """The registered backend called `name`, configured from `settings`."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown generator backend {name!r}; known: {', '.join(known_backends())}") from None
    return cls.from_settings(settings)

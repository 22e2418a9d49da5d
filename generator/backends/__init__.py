"""Generator backends: the interface and the lazy registry. Importing this package imports no backend."""

from generator.backends.base import (
    BACKENDS,
    Backend,
    ChatMessage,
    CommonOptions,
    Delta,
    Finished,
    GenerationParams,
    backend_class,
    create_backend,
    known_backends,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "ChatMessage",
    "CommonOptions",
    "Delta",
    "Finished",
    "GenerationParams",
    "backend_class",
    "create_backend",
    "known_backends",
]

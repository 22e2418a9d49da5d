"""Generator backends. Importing this package registers the built-in ones."""

from generator.backends import llama_cpp, openai, tensorrt_llm  # noqa: F401 - imported for their @register side effect
from generator.backends.base import (
    Backend,
    ChatMessage,
    Delta,
    Finished,
    GenerationParams,
    create_backend,
    known_backends,
    register,
)

__all__ = [
    "Backend",
    "ChatMessage",
    "Delta",
    "Finished",
    "GenerationParams",
    "create_backend",
    "known_backends",
    "register",
]

"""Settings and the backend registry, without a server."""

from __future__ import annotations

import pytest

from generator.backends import create_backend, known_backends
from generator.server import Settings


def test_unknown_backend_names_the_known_ones():
    assert known_backends() == ["llama_cpp", "openai"]
    with pytest.raises(ValueError, match="unknown generator backend 'vllm'; known: llama_cpp, openai"):
        create_backend("vllm", Settings())


def test_settings_come_from_flags_and_environment():
    settings = Settings.from_args(["--backend", "openai", "--max-message-mb", "8"], {"RAGLOOM_QUEUE_TIMEOUT_S": "2.5"})

    assert (settings.backend, settings.max_message_mb, settings.queue_timeout_s) == ("openai", 8, 2.5)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Settings(default_max_tokens=0).validate()

"""Settings and the backend registry, without a server."""

from __future__ import annotations

import pytest

from generator.backends import create_backend, known_backends
from generator.server import Settings


def test_unknown_backend_names_the_known_ones():
    assert known_backends() == ["llama_cpp", "openai", "tensorrt_llm"]
    with pytest.raises(ValueError, match="unknown generator backend 'vllm'; known: llama_cpp, openai, tensorrt_llm"):
        create_backend("vllm", Settings())


def test_settings_come_from_flags_and_environment():
    settings = Settings.from_args(["--backend", "openai", "--max-message-mb", "8"], {"RAGLOOM_QUEUE_TIMEOUT_S": "2.5"})

    assert (settings.backend, settings.max_message_mb, settings.queue_timeout_s) == ("openai", 8, 2.5)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Settings(default_max_tokens=0).validate()


def test_tensorrt_llm_settings_and_their_limits():
    settings = Settings.from_args(
        ["--backend", "tensorrt_llm", "--model-path", "/models/llama", "--trtllm-max-batch-size", "128"],
        {"RAGLOOM_TRTLLM_KV_CACHE_FRACTION": "0.85", "RAGLOOM_TRTLLM_TENSOR_PARALLEL_SIZE": "2"},
    )

    assert (settings.trtllm_max_batch_size, settings.trtllm_kv_cache_fraction) == (128, 0.85)
    assert settings.trtllm_tensor_parallel_size == 2
    for bad, match in [
        (dict(trtllm_kv_cache_fraction=1.5), "kv_cache_fraction"),
        (dict(trtllm_tensor_parallel_size=0), "tensor_parallel_size"),
        (dict(trtllm_max_in_flight=-1), "must be 0 or more"),
    ]:
        with pytest.raises(ValueError, match=match):
            Settings(**bad).validate()

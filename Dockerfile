# syntax=docker/dockerfile:1
# One image for every ragloom service: the container runs `ragloom serve <service>`.
#
#   docker build -t ghcr.io/ragloom/ragloom:0.1.0 .                      # CPU image (default target)
#   docker run --rm -p 50051:50051 ghcr.io/ragloom/ragloom:0.1.0 embedder
#   docker build --target gpu -t ghcr.io/ragloom/ragloom-gpu:0.1.0 .     # CUDA + TensorRT-LLM image
#
# Stages: builder (compilers; llama-cpp-python built once with portable flags; ragloom in a venv)
# -> exporter (adds torch to export the embedder's fp32 ONNX graph, then is thrown away)
# -> runtime (python:3.11-slim, the venv and the exported model, non-root). `gpu` is the
# same service on NVIDIA's TensorRT-LLM release image; it is built only when targeted.

ARG PYTHON_IMAGE=python:3.11-slim
# NVIDIA's TensorRT-LLM release image (CUDA, TensorRT, tensorrt_llm and torch preinstalled).
# generator/backends/tensorrt_llm.py follows the TensorRT-LLM 1.2 LLM API: pick the NGC tag of
# that release. (nvidia/cuda:12.x-cudnn-runtime-ubuntu22.04 suits an embedder-only GPU image.)
ARG GPU_BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
ARG LLAMA_CPP_VERSION=0.3.36
# Portable llama.cpp: no -march=native (the image runs on other CPUs than the one building it).
# AVX2/FMA/F16C (x86-64-v3: every x86 server CPU since 2013) on; AVX-512, AVX-VNNI and AMX off:
# many hosts lack them (SIGILL) and the AMX kernels crash even where AMX exists.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
# The CPU build of torch (the default wheels pull GBs of CUDA libraries), only to export the model.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG LLAMA_CPP_VERSION
ARG LLAMA_CMAKE_ARGS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv && pip install --upgrade pip setuptools wheel
# llama-cpp-python is sdist-only: build it first, with the flags above, so the dependency
# install below finds it satisfied instead of compiling it again with native flags.
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip wheel --no-deps --no-binary llama-cpp-python -w /wheels \
      "llama-cpp-python==${LLAMA_CPP_VERSION}" \
 && pip install --no-deps /wheels/llama_cpp_python-*.whl
WORKDIR /src
# Dependencies in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps . \
 && python -c "import mesh.cli, embedder.server, indexer.server, generator.server, router.server"

# ---------------------------------------------------------------------------------------------
FROM builder AS exporter
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
# The export extra (torch CPU, transformers, onnx); this stage's venv is not shipped.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install "transformers>=4.40" "onnx>=1.16"
# platformdirs puts the cache under $XDG_CACHE_HOME/ragloom: the runtime image sets the same path.
ENV XDG_CACHE_HOME=/opt/ragloom/cache
RUN python -c "from embedder.export import minilm_fp32; print(minilm_fp32())" \
 && test -f /opt/ragloom/cache/ragloom/models/all-MiniLM-L6-v2-fp32/model.onnx \
 && chmod -R a+rX /opt/ragloom/cache

# ---------------------------------------------------------------------------------------------
FROM ${GPU_BASE_IMAGE} AS gpu
ARG LLAMA_CPP_VERSION
ARG LLAMA_CMAKE_ARGS
ARG GPU_EXTRAS=tensorrt-llm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# --system-site-packages: tensorrt_llm, torch and CUDA's Python packages come from the base image.
RUN python3 -m venv --system-site-packages /opt/venv && pip install --upgrade pip setuptools wheel
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==${LLAMA_CPP_VERSION}"
WORKDIR /src
COPY . .
# onnxruntime-gpu replaces the CPU onnxruntime (same module) so the embedder can use CUDA/TensorRT.
RUN pip install ".[${GPU_EXTRAS}]" \
 && pip uninstall -y onnxruntime \
 && pip install onnxruntime-gpu
COPY --from=exporter /opt/ragloom/cache /opt/ragloom/cache
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/ragloom ragloom
ENV XDG_CACHE_HOME=/opt/ragloom/cache PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RAGLOOM_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/ragloom
EXPOSE 50051 9090
ENTRYPOINT ["ragloom", "serve"]
CMD ["generator"]

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# libgomp: llama.cpp's OpenMP threads.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 ragloom \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ragloom ragloom
COPY --from=builder /opt/venv /opt/venv
# The fp32 ONNX graph of all-MiniLM-L6-v2, where embedder.export looks for it (read-only is fine).
COPY --from=exporter /opt/ragloom/cache /opt/ragloom/cache
ENV PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/opt/ragloom/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RAGLOOM_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/ragloom
EXPOSE 50051 9090
ENTRYPOINT ["ragloom", "serve"]
CMD ["router"]

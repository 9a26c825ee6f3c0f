import builtins

import pytest

from services.inference.engine import LlamaCppEngine
from services.inference.engines import make_engine
from services.inference.vllm_engine import VllmEngine
from shared.errors import BadRequest, NotFound, Unavailable

pytestmark = pytest.mark.unit


@pytest.fixture
def no_vllm(monkeypatch):
    """Make `import vllm` fail even where it is installed."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_unknown_backend_is_not_found():
    with pytest.raises(NotFound) as info:
        make_engine("tensorrt", "/models/x", n_ctx=512, threads=1, embedding=False)
    assert info.value.field == "backend" and "tensorrt" in info.value.message


def test_make_engine_picks_the_backend_without_loading():
    llama = make_engine("llama_cpp", "/models/x.gguf", n_ctx=512, threads=3, embedding=True)
    assert isinstance(llama, LlamaCppEngine) and llama.threads == 3 and llama.embedding
    vllm = make_engine("vllm", "/models/hf", n_ctx=1024, threads=3, embedding=False, gpu_memory_utilization=0.5)
    assert isinstance(vllm, VllmEngine) and vllm.n_ctx == 1024 and vllm.gpu_memory_utilization == 0.5


def test_vllm_engine_constructs_and_load_says_what_to_install(no_vllm):
    engine = VllmEngine("/models/hf", n_ctx=2048, enforce_eager=True)
    assert engine.gpu_memory_utilization == 0.85 and engine.engine_kwargs == {"enforce_eager": True}
    with pytest.raises(Unavailable) as info:
        engine.load()
    assert info.value.field == "backend" and "gpu" in info.value.message


def test_vllm_embed_on_a_generation_model_is_refused():
    with pytest.raises(BadRequest):
        VllmEngine("/models/hf", n_ctx=512).embed(["x"])


def test_vllm_close_before_load_is_harmless():
    VllmEngine("/models/hf", n_ctx=512).close()

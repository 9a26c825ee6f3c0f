import builtins

import pytest

from services.inference import vllm_async
from services.inference.engine import LlamaCppEngine
from services.inference.engines import make_engine
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


def test_make_engine_picks_the_engine_without_loading():
    llama = make_engine("llama_cpp", "/models/x.gguf", n_ctx=512, threads=3, embedding=True)
    assert isinstance(llama, LlamaCppEngine) and llama.threads == 3 and llama.embedding
    with pytest.raises(BadRequest) as info:  # vLLM runs in its own async actor (vllm_replica.py)
        make_engine("vllm", "/models/hf", n_ctx=1024, threads=3, embedding=False)
    assert info.value.field == "backend"


def test_building_a_vllm_engine_without_vllm_says_what_to_install(no_vllm):
    with pytest.raises(Unavailable) as info:
        vllm_async.build("/models/hf", n_ctx=2048, embedding=False, max_batch=8)
    assert info.value.field == "backend" and "gpu" in info.value.message


def test_vllm_replicas_are_async_actors_with_room_for_control_calls():
    from services.inference.catalog import ModelSpec
    from services.inference.replicas import replica_class

    spec = ModelSpec(name="v", backend="vllm", tensor_parallel_size=2)
    assert spec.max_batch == 64 and spec.gpus == 2 and spec.actor_concurrency == 2 * 64 + 2
    assert replica_class("vllm").__ray_actor_class__.__name__ == "VllmReplica"
    assert replica_class("llama_cpp").__ray_actor_class__.__name__ == "LlamaReplica"

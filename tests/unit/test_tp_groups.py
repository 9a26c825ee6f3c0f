"""Tensor parallelism across nodes, the decisions (services/inference/tp_groups.py): a vLLM replica with
tensor_parallel_size N is placed as a gang of N GPU workers, keeps vLLM's `mp` executor when they share a node,
and otherwise gets one placement-group bundle per worker on the worker's node and vLLM's Ray executor."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest

from services.inference import tp_groups
from services.inference.catalog import ModelSpec
from services.inference.pool import ModelPool
from services.inference.replicas import pins, replica_specs
from services.inference.vllm_async import executor_backend
from services.scheduler.batch import place_all
from services.scheduler.cluster import NodeConfig
from services.scheduler.placement import Placer
from shared.errors import Unavailable

pytestmark = pytest.mark.unit


def _pool(tmp_path, **fields) -> ModelPool:
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 2**20)  # 1 MiB of "weights"
    spec = msgspec.convert({"name": "big", "backend": "vllm", "source": str(folder), **fields}, ModelSpec)
    return ModelPool(spec=spec, threads=1, source_path=str(folder))


def test_a_tensor_parallel_replica_is_one_gpu_instance_per_worker_in_one_gang(tmp_path):
    specs = replica_specs(_pool(tmp_path, tensor_parallel_size=3), "big/0")
    assert [s.instance_id for s in specs] == ["replica-big-0", "replica-big-0-gpu1", "replica-big-0-gpu2"]
    assert {s.group for s in specs} == {"replica-big-0"} and all(s.gpu_required for s in specs)
    share = round(2**20 / 2**30 / 3 * tp_groups.WORKER_GPU_MEMORY_FACTOR, 3)
    assert [s.gpu_memory_gb for s in specs] == [share] * 3
    assert [s.affinity for s in specs[1:]] == [["replica-big-0"]] * 2  # keep them on one node where they fit
    assert specs[0].ram_gb > specs[1].ram_gb  # the replica's process (tokenizer, scheduler) is worker 0's


def test_one_gpu_and_llama_replicas_stay_one_instance(tmp_path):
    [one] = replica_specs(_pool(tmp_path), "big/0")
    assert one.gpu_required and not one.group
    assert not tp_groups.is_tp_gang("llama_cpp", 2) and not tp_groups.is_tp_gang("vllm", 1)


def test_a_node_pin_pins_every_worker(tmp_path):
    pool = _pool(tmp_path, tensor_parallel_size=2, node="gpu-a")
    assert pins(pool, replica_specs(pool, "big/0")) == {"replica-big-0": "gpu-a", "replica-big-0-gpu1": "gpu-a"}


def test_workers_on_one_node_keep_the_mp_executor_and_several_nodes_get_a_group():
    assert not tp_groups.needs_group("vllm", 2, ["a", "a"])
    assert tp_groups.needs_group("vllm", 4, ["a", "a", "b", "b"])
    assert not tp_groups.needs_group("llama_cpp", 1, ["a", "b"])  # a sharded llama.cpp replica is no TP gang
    assert tp_groups.workers_per_node(["b", "a", "b"]) == {"b": 2, "a": 1}
    assert executor_backend(1) is None and executor_backend(2) == "mp" and executor_backend(2, object()) == "ray"


def test_bundles_hold_one_gpu_each_on_the_workers_nodes():
    assert tp_groups.bundles(["a", "b", "b"]) == [
        {"GPU": 1.0, "magi_node:a": 0.001}, {"GPU": 1.0, "magi_node:b": 0.001}, {"GPU": 1.0, "magi_node:b": 0.001}]


def test_more_workers_than_a_nodes_gpus_is_refused_naming_the_node():
    gpus = {"a": 1.0, "b": 2.0}.get
    tp_groups.check_fit("big", ["a", "b", "b"], gpus)
    with pytest.raises(Unavailable) as caught:
        tp_groups.check_fit("big", ["a", "a", "b"], gpus)
    assert caught.value.field == "tensor_parallel_size" and "node a" in caught.value.message
    assert "2 tensor-parallel worker(s)" in caught.value.message


def _placer(*nodes: tuple[str, float]) -> Placer:
    return Placer([NodeConfig(name=name, ram_gb=64, gpu=True, gpu_memory_gb=gb, max_instances=8) for name, gb in nodes])


def _workers(n: int, model_gb: float):
    return tp_groups.worker_specs("replica-big-0", n, ram_gb=4.0, model_gb=model_gb)


def test_the_scheduler_keeps_the_workers_together_when_one_node_holds_them():
    result = place_all(_placer(("a", 80.0), ("b", 80.0)), _workers(2, 40.0))
    assert not result.unplaced and len(set(result.placements.values())) == 1


def test_the_scheduler_spreads_the_workers_when_no_node_holds_them_all():
    result = place_all(_placer(("a", 30.0), ("b", 30.0), ("c", 10.0)), _workers(2, 40.0))  # 24 GB per worker
    assert not result.unplaced and sorted(result.placements.values()) == ["a", "b"]


def test_the_scheduler_places_no_worker_when_the_gang_cannot_fit():
    result = place_all(_placer(("a", 30.0), ("b", 10.0)), _workers(2, 40.0))
    assert not result.placements and set(result.unplaced) == {"replica-big-0", "replica-big-0-gpu1"}



class StandInAsyncLLM:
    """AsyncLLM's two constructors, recording what they were given (vLLM itself needs a GPU)."""

    @classmethod
    def from_engine_args(cls, args):
        return ("from_engine_args", args)

    @classmethod
    def from_vllm_config(cls, config, *, disable_log_stats):
        return ("from_vllm_config", config, disable_log_stats)


class StandInArgs:
    disable_log_stats = True

    def create_engine_config(self):
        return SimpleNamespace(parallel_config=SimpleNamespace(placement_group=None))


def test_a_group_reaches_the_engine_cores_parallel_config():
    from services.inference.vllm_async import _async_llm

    args = StandInArgs()
    assert _async_llm(StandInAsyncLLM, args, None) == ("from_engine_args", args)
    how, config, quiet = _async_llm(StandInAsyncLLM, args, "the group")
    assert how == "from_vllm_config" and config.parallel_config.placement_group == "the group" and quiet

"""GPU counts in placement: an instance holding GPUs (`InstanceSpec.gpus`) goes only where that many are free,
in the greedy placer, the exact solver and --explain; a node that does not report its GPUs is not limited."""

import msgspec
import pytest

from protos.node import GpuInfo, Heartbeat
from protos.sched import InstanceSpec
from services.inference import tp_groups
from services.inference.catalog import ModelSpec
from services.inference.pool import ModelPool
from services.inference.replicas import replica_specs
from services.scheduler.batch import place_all
from services.scheduler.cluster import ClusterConfig, NodeConfig, validate
from services.scheduler.core import node_from_heartbeat, with_reported
from services.scheduler.placement import Placer
from services.scheduler.planning import plan
from services.scheduler.solver import solve

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def gpu_node(name: str, gpu_count: int, gpu_memory_gb: float = 80.0) -> NodeConfig:
    return NodeConfig(name=name, ram_gb=64.0, gpu=True, gpu_memory_gb=gpu_memory_gb, gpu_count=gpu_count,
                      max_instances=8)


def one_gpu(instance_id: str, **kw) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, ram_gb=1.0, gpu_memory_gb=4.0, gpus=1, **kw)


def workers(n: int) -> list[InstanceSpec]:
    return tp_groups.worker_specs("replica-big-0", n, ram_gb=4.0, model_gb=8.0)


def test_a_node_with_two_gpus_takes_two_one_gpu_workers_but_not_three():
    result = place_all(Placer([gpu_node("a", 2)]), [one_gpu("w1"), one_gpu("w2"), one_gpu("w3")])
    assert len(result.placements) == 2 and set(result.placements.values()) == {"a"}
    assert list(result.unplaced.values()) == ["no node fits (a has 0 of 2 GPUs free, needs 1)"]
    assert result.optimal  # the solver ran and proved no placement holds three


def test_gpus_already_held_count_and_are_given_back_on_release():
    placer = Placer([gpu_node("a", 2)])
    placer.assign(InstanceSpec(instance_id="big", ram_gb=1.0, gpus=2), 0)
    assert not placer.feasible(one_gpu("w1"))[0]
    placer.unassign("big")
    assert placer.feasible(one_gpu("w1"))[0] and placer.gpu_used[0] == 0


def test_a_tensor_parallel_gang_of_four_spreads_over_two_nodes_of_two_gpus():
    result = place_all(Placer([gpu_node("a", 2), gpu_node("b", 2)]), workers(4))
    assert not result.unplaced
    assert sorted(result.placements.values()) == ["a", "a", "b", "b"]


def test_a_gang_that_needs_more_gpus_than_the_cluster_has_places_no_worker():
    result = place_all(Placer([gpu_node("a", 2), gpu_node("b", 1)]), workers(4))
    assert not result.placements and len(result.unplaced) == 4
    assert "its 4 members do not all fit at once" in result.unplaced["replica-big-0-gpu3"]


def test_an_unknown_gpu_count_is_not_limited():
    # Without a count the gang stays together on one node (its workers' affinity), as before GPU counts.
    result = place_all(Placer([gpu_node("a", 0), gpu_node("b", 0)]), workers(4))
    assert not result.unplaced and len(set(result.placements.values())) == 1
    placer = Placer([gpu_node("a", 0)])
    assert place_all(placer, [one_gpu(f"w{k}") for k in range(5)]).unplaced == {}


def test_an_instance_holding_a_gpu_needs_a_gpu_node_even_without_gpu_required():
    nodes = [NodeConfig(name="cpu", ram_gb=64.0, max_instances=8)]
    result = place_all(Placer(nodes), [InstanceSpec(instance_id="w", ram_gb=1.0, gpus=1)])
    assert result.unplaced == {"w": "no node fits (cpu has no GPU)"}


def test_explain_names_gpus_as_the_binding_constraint():
    running = {"old": (one_gpu("old"), "a")}
    result = plan([gpu_node("a", 1), gpu_node("b", 2)], [one_gpu("w1"), one_gpu("w2"), one_gpu("w3")],
                  running=running, explain=True)
    assert len(result.placements) == 2 and set(result.placements.values()) == {"b"}
    [late] = result.unplaced
    why = result.explanations[late]
    assert why.binding == "gpus"
    assert why.nodes == {"a": ["0 of 1 GPUs free, needs 1"], "b": ["0 of 2 GPUs free, needs 1"]}
    assert "relaxing it alone would open 2 of 2 nodes" in why.summary


def test_the_solver_places_no_more_gpus_on_a_node_than_are_free():
    placer = Placer([gpu_node("a", 3), gpu_node("b", 2)])
    placer.assign(one_gpu("running"), placer.index["a"])  # a has 2 of 3 free
    specs = [one_gpu(f"w{k}") for k in range(6)]
    solved = solve(placer, specs, budget_s=5.0, score=False)
    assert solved is not None and solved.count_proven
    on = [placer.names[n] for n in solved.where.values()]
    assert len(on) == 4 and on.count("a") == 2 and on.count("b") == 2


def test_the_solver_counts_an_instance_holding_several_gpus_as_that_many():
    placer = Placer([gpu_node("a", 4)])
    specs = [InstanceSpec(instance_id=name, ram_gb=1.0, gpus=gpus) for name, gpus in
             [("pair1", 2), ("pair2", 2), ("triple", 3)]]
    solved = solve(placer, specs, budget_s=5.0, score=False)
    assert solved is not None and solved.count_proven and sorted(solved.where) == ["pair1", "pair2"]


def test_a_heartbeat_gives_its_gpu_count():
    gpus = [GpuInfo(name="H100", memory_total_gb=80.0), GpuInfo(name="H100", memory_total_gb=80.0)]
    node = node_from_heartbeat(Heartbeat(node="g", seq=1, sent_at=0.0, ram_total_gb=64.0, gpus=gpus))
    assert node.gpu and node.gpu_count == 2 and node.gpu_memory_gb == 160.0
    assert node_from_heartbeat(Heartbeat(node="c", seq=1, sent_at=0.0, ram_total_gb=8.0)).gpu_count == 0


def test_a_configured_gpu_node_takes_its_gpu_count_from_the_heartbeat_unless_the_file_gives_one():
    hb = Heartbeat(node="g", seq=1, sent_at=0.0, ram_total_gb=64.0, gpus=[GpuInfo(name="A", memory_total_gb=24.0)] * 3)
    assert with_reported(gpu_node("g", 0), hb).gpu_count == 3
    assert with_reported(gpu_node("g", 2), hb).gpu_count == 2  # the file's figure wins, as for RAM
    assert with_reported(NodeConfig(name="g", ram_gb=64.0), hb).gpu_count == 0  # the file says no GPU


def test_a_cluster_file_refuses_a_gpu_count_on_a_node_without_gpu():
    raw = {"cluster": {"name": "c"}, "nodes": [{"name": "n", "ram_gb": 8, "gpu_count": 2}]}
    _, problems = validate(raw, ClusterConfig)
    assert problems == ["nodes[0].gpu_count: set but gpu is false"]


def test_replicas_hold_their_gpus(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 2**20)

    def specs(**fields):
        spec = msgspec.convert({"name": "big", "source": str(folder), **fields}, ModelSpec)
        return replica_specs(ModelPool(spec=spec, threads=1, source_path=str(folder)), "big/0")

    assert [s.gpus for s in specs(backend="vllm", tensor_parallel_size=3)] == [1, 1, 1]  # one per worker
    assert [s.gpus for s in specs(backend="vllm")] == [1]
    assert [s.gpus for s in specs(backend="llama_cpp", n_gpu_layers=99, tensor_split=[1, 1])] == [2]
    assert [s.gpus for s in specs(backend="llama_cpp")] == [0]

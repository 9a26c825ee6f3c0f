"""The seed-002 scenarios and seed-001's coordinator scores, as the seeds give them."""

import pytest

from protos.sched import InstanceSpec
from services.scheduler import batch
from services.scheduler.batch import place_all
from services.scheduler.cluster import NodeConfig
from services.scheduler.placement import Placer, coordinator_score_mb

pytestmark = pytest.mark.unit

JETSON = NodeConfig(name="jetson", type="jetson_orin", ram_gb=64.0, gpu=True, gpu_memory_gb=64.0, cpu_cores=12,
                    max_instances=4, reserved_ram_gb=8.0)
RPI1 = NodeConfig(name="rpi1", type="raspberry_pi", ram_gb=8.0, cpu_cores=4, max_instances=1, reserved_ram_gb=1.0)
RPI2 = NodeConfig(name="rpi2", type="raspberry_pi", ram_gb=8.0, cpu_cores=4, max_instances=1, reserved_ram_gb=1.0)


def spec(instance_id, ram_gb, **kw):
    return InstanceSpec(instance_id=instance_id, ram_gb=ram_gb, **kw)


def test_split_brain():
    result = place_all(Placer([JETSON, RPI1]), [
        spec("brain_A", 8.0, gpu_required=True),
        spec("brain_B", 2.0, anti_affinity=["brain_A"]),
    ])
    assert result.placements == {"brain_A": "jetson", "brain_B": "rpi1"} and not result.unplaced


def test_hive_cluster():
    placer = Placer([JETSON, RPI1])
    result = place_all(placer, [
        spec("historian", 12.0, gpu_preferred=True),
        spec("critic", 12.0, gpu_preferred=True),
        spec("optimist", 12.0, gpu_preferred=True),
        spec("pessimist", 6.0),
    ])
    assert result.placements == {"historian": "jetson", "critic": "jetson", "optimist": "jetson", "pessimist": "rpi1"}
    # The seed's figures: Jetson 36/64 GB (56 %), RPi 6/8 GB (75 %).
    assert placer.ram_alloc.tolist() == [36.0, 6.0]
    assert (placer.ram_alloc / placer.total * 100).round(2).tolist() == [56.25, 75.0]


def test_panopticon():
    result = place_all(Placer([JETSON, RPI1]), [
        spec("subject", 6.0, preferred_node="rpi1"),
        spec("observer", 8.0, gpu_required=True, affinity=["subject"]),
    ])
    assert result.placements == {"subject": "rpi1", "observer": "jetson"}


def test_prisoners_dilemma_explicit_placement():
    result = place_all(Placer([JETSON, RPI1, RPI2]), [spec("player_a", 2.0), spec("player_b", 2.0)],
                       explicit={"player_a": "rpi1", "player_b": "rpi2"})
    assert result.placements == {"player_a": "rpi1", "player_b": "rpi2"}


def test_explicit_placement_never_breaks_a_hard_constraint():
    result = place_all(Placer([JETSON, RPI1]), [spec("big", 7.5)], explicit={"big": "rpi1"})
    assert result.placements == {} and "rpi1 has 7.0 GB RAM free" in result.unplaced["big"]
    result = place_all(Placer([JETSON, RPI1]), [spec("x", 1.0)], explicit={"x": "nowhere"})
    assert "not in the cluster" in result.unplaced["x"]


def test_gang_is_all_or_nothing():
    placer = Placer([JETSON, RPI1])
    result = place_all(placer, [spec("shard0", 40.0, group="llama70b"), spec("shard1", 40.0, group="llama70b"),
                                spec("solo", 1.0)])
    assert set(result.unplaced) == {"shard0", "shard1"} and "gang 'llama70b'" in result.unplaced["shard0"]
    assert result.placements == {"solo": "rpi1"} or result.placements == {"solo": "jetson"}
    assert placer.count.sum() == 1


def test_unavailable_node_gets_nothing():
    result = place_all(Placer([JETSON, RPI1], unavailable={"jetson"}), [spec("gpu_job", 1.0, gpu_required=True)])
    assert result.unplaced == {"gpu_job": "no node fits (jetson is not healthy; rpi1 has no GPU)"}


def test_search_finds_what_greedy_order_misses(monkeypatch):
    # Greedy puts the 5 GB instance on n1 (the only single-slot node), leaving no home for i1:
    # anti-affinity keeps it off n0. The search places all three.
    nodes = [NodeConfig(name="n0", ram_gb=6.0, max_instances=2), NodeConfig(name="n1", ram_gb=8.0, max_instances=1)]
    specs = [spec("i0", 5.0), spec("i1", 1.0), spec("i2", 2.0, anti_affinity=["i1"])]
    monkeypatch.setattr(batch, "SEARCH_MAX_INSTANCES", 0)
    assert "i1" in place_all(Placer(nodes), specs).unplaced
    monkeypatch.undo()
    result = place_all(Placer(nodes), specs)
    assert result.placements == {"i0": "n0", "i1": "n0", "i2": "n1"} and not result.unplaced


@pytest.mark.parametrize("node_ram, gpu_gb, expected", [(16.0, 0.0, -127360.0), (128.0, 24.0, 13640.0),
                                                        (32.0, 0.0, -111360.0)])
def test_seed_001_coordinator_scores(node_ram, gpu_gb, expected):
    assert coordinator_score_mb(node_ram, gpu_gb, gpu_gb > 0, 143.36) == pytest.approx(expected)


def test_coordinator_goes_to_the_best_seed_001_score():
    nodes = [NodeConfig(name="head", ram_gb=16.0), NodeConfig(name="worker20", ram_gb=128.0, gpu=True, gpu_memory_gb=24.0),
             NodeConfig(name="worker21", ram_gb=32.0)]
    result = place_all(Placer(nodes), [spec("coordinator", 2.0, model_size_gb=143.36)])
    assert result.placements == {"coordinator": "worker20"}

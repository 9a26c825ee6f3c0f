"""A sharded replica's placement request: a gang of its coordinator and shards, the coordinator on the
node with the best seed-001 score, planned by the scheduler's own planning code."""

import pytest

from services.inference.catalog import ModelSpec, resolve_source
from services.inference.pool import ModelPool
from services.inference.replicas import gang_specs
from services.scheduler.cluster import NodeConfig
from services.scheduler.planning import plan

pytestmark = pytest.mark.unit

BIG = NodeConfig(name="melchior", type="host", ram_gb=128.0, gpu=True, gpu_memory_gb=24.0, cpu_cores=16)
MID = NodeConfig(name="lilith", type="generic", ram_gb=32.0, cpu_cores=8)
PI = NodeConfig(name="rpi1", type="raspberry_pi", ram_gb=8.0, cpu_cores=4, max_instances=1)


def _pool(shards: int) -> ModelPool:
    spec = ModelSpec(name="smollm2-135m", shards=shards)
    return ModelPool(spec=spec, threads=1, source_path=str(resolve_source(spec.source)))


def test_gang_is_coordinator_plus_one_instance_per_shard():
    specs = gang_specs(_pool(3), "smollm2-135m/0")
    assert [s.instance_id for s in specs] == ["replica-smollm2-135m-0"] + [
        f"replica-smollm2-135m-0-shard{k}" for k in range(3)]
    assert {s.group for s in specs} == {"replica-smollm2-135m-0"}
    assert specs[0].model_size_gb > 0 and all(s.model_size_gb == 0 for s in specs[1:])


def test_coordinator_goes_to_the_best_seed_001_score():
    result = plan([PI, MID, BIG], gang_specs(_pool(2), "smollm2-135m/0"))
    assert not result.unplaced
    assert result.placements["replica-smollm2-135m-0"] == "melchior"


def test_a_gang_that_cannot_fit_whole_is_not_placed_at_all():
    full = NodeConfig(name="tiny", type="raspberry_pi", ram_gb=8.0, cpu_cores=4, max_instances=2)
    result = plan([full], gang_specs(_pool(4), "smollm2-135m/0"))
    assert not result.placements and len(result.unplaced) == 5

"""Tensor parallelism across nodes on a real two-node Ray cluster (both nodes on this machine, each declaring
one GPU to Ray, which Ray counts without looking for hardware): the placement group holds a bundle per worker
on the worker's node, the replica's actor runs in bundle 0 on the first worker's node without a GPU of its
own, vLLM-style workers (one GPU each, scheduled onto a bundle) land on the nodes the scheduler chose, and
retiring the replica kills the actor and removes the group. No vLLM here: the actor is a probe with the
options and the driver set-up the vLLM replica gets, or the real VllmReplica started by the inference service's
ReplicaFactory (the scheduler's answer fixed), which finds its group and then fails for want of vLLM."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys

import msgspec
import pytest

import services.inference.ray_runtime  # noqa: F401  (Ray on loopback only, set before Ray is imported)
from services.inference import tp_groups
from services.inference.catalog import ModelSpec
from services.inference.keeper import Keeper
from services.inference.pool import ModelPool, Replica
from services.inference.replicas import ReplicaFactory
from shared.config import Settings
from shared.errors import Unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray's loopback switch (ray_runtime.py): in the environment for the Ray processes the cluster starts, and
    # in this process's copy, read when Ray was imported (perhaps by an earlier test, before it was set).
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    patch.delenv("RAY_ADDRESS", raising=False)
    nodes = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, num_gpus=1, resources={"magi_node:a": 1000}, include_dashboard=False))
    try:
        nodes.add_node(num_cpus=1, num_gpus=1, resources={"magi_node:b": 1000})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, namespace="magi-test", log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        patch.undo()


@ray.remote(num_cpus=0)
class Worker:
    """Stands in for vLLM's RayWorkerWrapper: where it runs and the GPU Ray gave it."""

    def where(self) -> tuple[str, list]:
        return ray.get_runtime_context().get_node_id(), ray.get_runtime_context().get_accelerator_ids()["GPU"]


@ray.remote
class Probe:
    """The replica actor's view: its node, its group, and workers started into the group's bundles as vLLM's Ray
    executor starts them (`num_gpus=1, num_cpus=0`, PlacementGroupSchedulingStrategy on bundle k)."""

    def __init__(self) -> None:
        self.group = tp_groups.prepare_driver()

    def driver(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "group": self.group.id.hex(),
                "gpus": ray.get_runtime_context().get_accelerator_ids()["GPU"],
                "ray_address": os.environ.get("RAY_ADDRESS"), "gcs": ray.get_runtime_context().gcs_address}

    def engine_core(self) -> list[str]:
        """Where the workers of a child process like vLLM's engine core land (see ENGINE_CORE)."""
        out = subprocess.run([sys.executable, "-c", ENGINE_CORE, pickle.dumps(self.group).hex()], env=os.environ,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start_workers(self) -> list:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        workers = [Worker.options(num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=k)).remote() for k in range(2)]
        return ray.get([w.where.remote() for w in workers])


# What vLLM's engine core does in its own process (AsyncLLM's child, a new Ray driver in no group): `ray.init()`
# from the environment the replica set, then one GPU worker per bundle of the group it was handed.
ENGINE_CORE = """
import json, pickle, sys
import ray
group = pickle.loads(bytes.fromhex(sys.argv[1]))
ray.init(log_to_driver=False)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
@ray.remote(num_cpus=0, num_gpus=1)
def where():
    return ray.get_runtime_context().get_node_id()
refs = [where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group,
        placement_group_bundle_index=k)).remote() for k in range(len(group.bundle_specs))]
print(json.dumps(ray.get(refs, timeout=60)))
"""


def _node_ids() -> dict[str, str]:
    return {key.split(":", 1)[1]: n["NodeID"] for n in ray.nodes() if n["Alive"]
            for key in n["Resources"] if key.startswith("magi_node:")}


def _state(group) -> str:
    return ray.util.placement_group_table(group)["state"]


def test_a_replica_across_nodes_runs_in_its_group_and_retiring_it_removes_the_group(cluster):
    ids = _node_ids()
    group = asyncio.run(tp_groups.reserve(["b", "a"], "tp:replica:big/0", timeout_s=60))
    options = {"name": "replica:big/0", "num_cpus": 0, "num_gpus": 2, "resources": {"magi_node:b": 0.001},
               "max_restarts": 0}
    probe = Probe.options(**tp_groups.in_group(options, group)).remote()
    tp_groups.remember(probe, group)
    driver = ray.get(probe.driver.remote(), timeout=60)
    assert driver["node"] == ids["b"] and driver["gpus"] == []  # bundle 0's node; the GPUs stay with the workers
    assert driver["group"] == group.id.hex() and driver["ray_address"] == driver["gcs"]
    workers = ray.get(probe.start_workers.remote(), timeout=60)
    assert [node for node, _ in workers] == [ids["b"], ids["a"]] and all(len(g) == 1 for _, g in workers)
    assert ray.get(probe.engine_core.remote(), timeout=180) == [ids["b"], ids["a"]]

    Keeper(make=None).retire(Replica(replica_id="big/0", actor=probe))
    assert _state(group) == "REMOVED" and tp_groups.group_of(probe) is None
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(probe.driver.remote(), timeout=30)


def test_a_group_ray_cannot_provide_is_refused_and_not_left_waiting(cluster):
    async def reserve():
        return await tp_groups.reserve(["a", "a"], "tp:too-many", timeout_s=3)  # node a has one GPU

    with pytest.raises(Unavailable) as caught:
        asyncio.run(reserve())
    assert caught.value.field == "tensor_parallel_size" and "node(s) a" in caught.value.message
    [left] = [g for g in ray.util.placement_group_table().values() if g["name"] == "tp:too-many"]
    assert left["state"] == "REMOVED"


class SpreadFactory(ReplicaFactory):
    """The inference service's ReplicaFactory with the scheduler's answer fixed: its workers on b, then a."""

    async def _place_on_live_nodes(self, pool, replica_id, specs):
        assert [s.instance_id for s in specs] == ["replica-big-0", "replica-big-0-gpu1"]
        return ["b", "a"]


def test_the_factory_starts_a_spread_replica_in_its_group_and_the_keeper_removes_it(cluster, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    spec = msgspec.convert({"name": "big", "backend": "vllm", "source": str(folder), "tensor_parallel_size": 2},
                           ModelSpec)
    factory = SpreadFactory(Settings(home=str(tmp_path)), None)
    replica = asyncio.run(factory(ModelPool(spec=spec, threads=1, source_path=str(folder)), 0))
    group = tp_groups.group_of(replica.actor)
    assert replica.placed == ["b", "a"] and replica.node == "b" and not replica.shard_actors
    assert group is not None and group.bundle_specs == tp_groups.bundles(["b", "a"])
    ids = _node_ids()
    table = ray.util.placement_group_table(group)
    assert table["state"] == "CREATED" and list(table["bundles_to_node_id"].values()) == [ids["b"], ids["a"]]
    # The actor itself then fails here (no vLLM), after it found its group: its error says what is missing.
    with pytest.raises(ray.exceptions.RayActorError, match="vLLM"):
        ray.get(replica.actor.warmup.remote(), timeout=60)
    Keeper(make=None).retire(replica)
    assert _state(group) == "REMOVED"

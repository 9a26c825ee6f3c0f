"""`magi.sched.rebalance` with real processes: a dry run changes nothing; applying moves an instance with its
new copy running before the old one stops."""

import asyncio

import psutil
import pytest

from magi.localcluster import SLEEPER, LocalCluster
from protos.node import NodesReply
from protos.sched import InstanceSpec, PlaceReply, PlaceRequest, RebalanceReply, RebalanceRequest
from shared import bus
from tests.integration.private_stack import scheduler_and_two_agents

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
async def cluster(tmp_path):
    async with scheduler_and_two_agents(tmp_path) as c:
        yield c


async def copies(c: LocalCluster, instance_id: str) -> dict[str, int]:
    """node -> pid of every running copy of the instance, as the agents report them."""
    reply = await bus.request(c.nc, "magi.sched.nodes", b"{}", NodesReply, timeout=5)
    return {n.name: i.pid for n in reply.nodes for i in n.heartbeat.instances
            if i.instance_id == instance_id and i.state == "running"}


async def test_rebalance_moves_an_instance_to_its_preferred_node_new_copy_first(cluster):
    spec = InstanceSpec(instance_id="drifter", ram_gb=0.5, preferred_node="node-b", command=SLEEPER, restart="always")
    placed = await bus.request(cluster.nc, "magi.sched.place", PlaceRequest(
        instances=[spec], placement={"drifter": "node-a"}), PlaceReply, timeout=5)
    assert placed.placements == {"drifter": "node-a"} and placed.optimal
    await cluster.until(lambda: cluster.runs_on("drifter", "node-a"), timeout=10)
    old_pid = (await copies(cluster, "drifter"))["node-a"]

    dry = await bus.request(cluster.nc, "magi.sched.rebalance", RebalanceRequest(dry_run=True), RebalanceReply,
                            timeout=10)
    assert [(m.instance_id, m.from_node, m.to_node) for m in dry.moves] == [("drifter", "node-a", "node-b")]
    assert dry.applied == [] and dry.epoch == placed.epoch and dry.score_after > dry.score_before
    await asyncio.sleep(1.5)
    assert await copies(cluster, "drifter") == {"node-a": old_pid}  # a dry run changes nothing

    task = asyncio.create_task(bus.request(cluster.nc, "magi.sched.rebalance", RebalanceRequest(dry_run=False),
                                           RebalanceReply, timeout=60))
    both_seen = False
    while not task.done():
        running = await copies(cluster, "drifter")
        both_seen |= running.keys() == {"node-a", "node-b"}
        if "node-a" not in running:
            assert "node-b" in running or both_seen, "the old copy stopped before the new one ran"
        await asyncio.sleep(0.05)
    reply = task.result()
    assert reply.applied == ["drifter"] and not reply.failed and reply.epoch > placed.epoch
    assert both_seen
    await cluster.until(lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie", 5)
    await cluster.until(lambda: cluster.runs_on("drifter", "node-b"), timeout=5)

    again = await bus.request(cluster.nc, "magi.sched.rebalance", RebalanceRequest(dry_run=True), RebalanceReply,
                              timeout=10)
    assert again.moves == []  # already where it scores best

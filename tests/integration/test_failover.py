"""Failover with real processes: agents as separate OS processes on one machine, real NATS and Redis."""

import asyncio
import os
import signal
import sys

import psutil
import pytest

from magi.localcluster import LocalCluster
from protos.node import ClusterReport
from protos.sched import InstanceSpec, PlaceReply, PlaceRequest
from shared import bus
from tests.integration.private_stack import scheduler_and_two_agents

pytestmark = pytest.mark.integration

@pytest.fixture
async def cluster(tmp_path):
    async with scheduler_and_two_agents(tmp_path) as c:
        yield c


async def place_one(c: LocalCluster, instance_id: str, node: str) -> int:
    return await c.place_on(instance_id, node)


def _running_on(c, instance_id, node):
    return c.runs_on(instance_id, node)


async def test_kill_9_of_an_agent_moves_its_instances(cluster):
    old_pid = await place_one(cluster, "worker", "node-a")
    os.kill(cluster.procs["a"].pid, signal.SIGKILL)
    took = await cluster.until(lambda: _running_on(cluster, "worker", "node-b"), timeout=10)
    assert took < 6.0
    await cluster.until(lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie", 3)
    report = await bus.request(cluster.nc, "magi.sched.report", b"{}", ClusterReport, timeout=5)
    assert any("node-a is unavailable" in w for w in report.warnings)


async def test_a_pause_shorter_than_the_grace_period_moves_nothing(cluster):
    pid = await place_one(cluster, "steady", "node-a")
    agent = cluster.procs["a"].pid
    os.kill(agent, signal.SIGSTOP)
    await asyncio.sleep(2.0)
    os.kill(agent, signal.SIGCONT)
    await asyncio.sleep(2.0)
    assert (await cluster.running_on())["steady"] == ("node-a", pid)


async def test_a_node_back_from_a_long_pause_is_fenced(cluster):
    old_pid = await place_one(cluster, "fenced", "node-a")
    agent = cluster.procs["a"].pid
    os.kill(agent, signal.SIGSTOP)
    await cluster.until(lambda: _running_on(cluster, "fenced", "node-b"), timeout=10)
    os.kill(agent, signal.SIGCONT)
    # Within about one heartbeat of waking up, node-a stops the copy it no longer owns.
    took = await cluster.until(lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie", 5)
    assert took < 2.5
    await asyncio.sleep(1.5)
    running = await cluster.running_on()
    assert running["fenced"][0] == "node-b"


async def test_scheduler_restart_loses_and_duplicates_nothing(cluster):
    pids = {iid: await place_one(cluster, iid, node) for iid, node in (("p1", "node-a"), ("p2", "node-b"))}
    os.kill(cluster.procs["sched"].pid, signal.SIGKILL)
    cluster.procs["sched"].wait()
    await cluster.start("sched", "services.scheduler")
    await asyncio.sleep(4.0)  # past the grace period: a wrong restart would have re-placed by now
    running = await cluster.running_on()
    assert {k: v for k, v in running.items() if k in pids} == {"p1": ("node-a", pids["p1"]), "p2": ("node-b", pids["p2"])}


async def test_crash_loop_is_reported_not_replaced(cluster, monkeypatch):
    spec = InstanceSpec(instance_id="crasher", ram_gb=0.5, restart="always",
                        command=[sys.executable, "-c", "raise SystemExit(1)"])
    await bus.request(cluster.nc, "magi.sched.place", PlaceRequest(instances=[spec], placement={"crasher": "node-a"}),
                      PlaceReply, timeout=5)

    async def reported() -> bool:
        report = await bus.request(cluster.nc, "magi.sched.report", b"{}", ClusterReport, timeout=5)
        return any("crasher is crash-looping on node-a" in w for w in report.warnings)

    await cluster.until(reported, timeout=40)


async def test_drain_moves_instances_off_and_blocks_new_placements_until_undrained(cluster):
    from protos.sched import DrainReply

    old_pid = await place_one(cluster, "mover", "node-a")
    reply = await bus.request(cluster.nc, "magi.sched.drain", {"node": "node-a"}, DrainReply, timeout=5)
    assert reply.status == "MAINTENANCE" and reply.moved == {"mover": "node-b"}
    await cluster.until(lambda: _running_on(cluster, "mover", "node-b"), timeout=10)
    await cluster.until(lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie", 5)
    pinned = await bus.request(cluster.nc, "magi.sched.place", PlaceRequest(
        instances=[InstanceSpec(instance_id="newcomer", ram_gb=0.1)], placement={"newcomer": "node-a"}),
        PlaceReply, timeout=5)
    assert "newcomer" in pinned.unplaced and "newcomer" not in pinned.placements
    free = await bus.request(cluster.nc, "magi.sched.place", PlaceRequest(
        instances=[InstanceSpec(instance_id="another", ram_gb=0.1)]), PlaceReply, timeout=5)
    assert free.placements == {"another": "node-b"}
    back = await bus.request(cluster.nc, "magi.sched.drain", {"node": "node-a", "drain": False}, DrainReply, timeout=5)
    assert back.status == "HEALTHY"
    again = await bus.request(cluster.nc, "magi.sched.place", PlaceRequest(
        instances=[InstanceSpec(instance_id="welcome", ram_gb=0.1)], placement={"welcome": "node-a"}),
        PlaceReply, timeout=5)
    assert again.placements == {"welcome": "node-a"}

"""Failover with real processes: agents as separate OS processes on one machine, real NATS and Redis."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import nats
import psutil
import pytest

from protos.node import ClusterReport, NodesReply
from protos.sched import InstanceSpec, PlaceReply, PlaceRequest
from shared import bus, stack
from shared.procs import free_port, stop_tree

pytestmark = pytest.mark.integration

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


class Cluster:
    """A scheduler and named agents, each its own process, on a private NATS + Redis."""

    def __init__(self, home, heartbeat_s: float) -> None:
        self.cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=())
        self.heartbeat_s = heartbeat_s
        self.procs: dict[str, subprocess.Popen] = {}

    async def up(self) -> None:
        self.state = await stack.up(self.cfg)
        self.nc = await nats.connect(self.state.nats_url)

    def env(self, node: str = "") -> dict[str, str]:
        env = dict(os.environ, MAGI_NATS_URL=self.state.nats_url, MAGI_REDIS_URL=self.state.redis_url,
                   MAGI_HOME=str(self.cfg.home / (node or "sched")), MAGI_HEARTBEAT_S=str(self.heartbeat_s))
        if node:
            env["MAGI_NODE_NAME"] = node
            env["MAGI_NODE_LABELS"] = "max_instances=4"
        return env

    async def start(self, key: str, module: str, node: str = "") -> None:
        log = open(self.cfg.home / f"{key}.log", "ab")
        self.procs[key] = subprocess.Popen([sys.executable, "-m", module], env=self.env(node), stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        name = "magi-agent" if node else "magi-scheduler"
        await self.until(lambda: self._answers(name, node), timeout=20)

    async def _answers(self, name: str, node: str) -> bool:
        subject = f"magi.node.{node}.info" if node else "magi.sched.nodes"
        try:
            await self.nc.request(subject, b"{}", timeout=0.3)
            return True
        except Exception:
            return False

    async def until(self, predicate, timeout: float) -> float:
        start = time.monotonic()
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, "condition not met in time"
            await asyncio.sleep(0.05)

    async def running_on(self) -> dict[str, tuple[str, int]]:
        """instance -> (node, pid) for instances an agent reports running."""
        reply = await bus.request(self.nc, "magi.sched.nodes", b"{}", NodesReply, timeout=5)
        return {i.instance_id: (n.name, i.pid) for n in reply.nodes if n.status != "UNAVAILABLE"
                for i in n.heartbeat.instances if i.state == "running"}

    async def down(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                stop_tree(proc.pid, grace=10)
        await self.nc.close()
        stack.down(self.cfg.home)


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(tmp_path, heartbeat_s=1.0)
    await c.up()
    await c.start("sched", "services.scheduler")
    await c.start("a", "services.agent", "node-a")
    await c.start("b", "services.agent", "node-b")
    try:
        yield c
    finally:
        await c.down()


async def place_one(c: Cluster, instance_id: str, node: str, command=SLEEPER) -> int:
    spec = InstanceSpec(instance_id=instance_id, ram_gb=0.5, command=command, restart="always")
    reply = await bus.request(c.nc, "magi.sched.place", PlaceRequest(instances=[spec], placement={instance_id: node}),
                              PlaceReply, timeout=5)
    assert reply.placements == {instance_id: node}, reply.unplaced
    await c.until(lambda: _running_on(c, instance_id, node), timeout=10)
    return (await c.running_on())[instance_id][1]


async def _running_on(c, instance_id, node) -> bool:
    return (await c.running_on()).get(instance_id, ("", 0))[0] == node


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

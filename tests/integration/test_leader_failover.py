"""Two schedulers on one Redis, as separate OS processes with real agents: one leads, the other takes over.

The leader is found by its lease in Redis (`<token>:<host>-<pid>`); with 1 s heartbeats the lease is the
default 3 s, renewed every second, so a standby leads at most about 4 s after the leader stops renewing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest
import redis.asyncio as aioredis

from magi.localcluster import LocalCluster
from protos.node import NodesReply
from protos.sched import InstanceSpec, PlaceReply, PlaceRequest
from services.scheduler.lease import LEADER_KEY
from services.scheduler.placements import EPOCH_KEY
from services.scheduler.state import NODES_KEY
from shared import bus
from shared.errors import MagiError

pytestmark = pytest.mark.integration

TAKEOVER_S = 3.0 + 1.0  # the lease's TTL and one renewal round


@pytest.fixture
async def cluster(tmp_path):
    c = LocalCluster(tmp_path, heartbeat_s=1.0)
    await c.up()
    c.redis = aioredis.from_url(c.state.redis_url)
    try:
        await c.start("sched1", "services.scheduler")
        await c.start("sched2", "services.scheduler")
        await c.start("a", "services.agent", "node-a")
        await c.start("b", "services.agent", "node-b")
        yield c
    finally:
        await c.redis.aclose()
        await c.down()


async def leader_key(c: LocalCluster) -> str:
    """The scheduler process (its LocalCluster key) whose pid is in the lease."""
    value = (await c.redis.get(LEADER_KEY) or b"").decode()
    pid = int(value.rpartition("-")[2]) if value else 0
    return next((k for k, p in c.procs.items() if k.startswith("sched") and p.pid == pid), "")


async def place_until_accepted(c: LocalCluster, instance_id: str, node: str, timeout: float) -> float:
    """Retry a placement through 503s and timeouts (no leader yet, or a paused one) until one is accepted."""
    spec = InstanceSpec(instance_id=instance_id, ram_gb=0.1)
    started = time.monotonic()
    while True:
        try:
            reply = await bus.request(c.nc, "magi.sched.place", PlaceRequest(instances=[spec], placement={
                instance_id: node}), PlaceReply, timeout=1.0)
            assert reply.placements == {instance_id: node}, reply
            return time.monotonic() - started
        except MagiError as exc:
            assert exc.code in (503, 504), exc
            assert time.monotonic() - started < timeout, f"no leader accepted a placement in {timeout} s"
            await asyncio.sleep(0.1)


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_one_leads_and_the_standby_takes_over_a_killed_leader(cluster):
    first = await leader_key(cluster)
    assert first in ("sched1", "sched2")
    pid = await cluster.place_on("worker", "node-a")
    os.kill(cluster.procs[first].pid, signal.SIGKILL)
    killed = time.monotonic()
    await place_until_accepted(cluster, "after-kill", "node-b", timeout=TAKEOVER_S + 3)
    assert time.monotonic() - killed < TAKEOVER_S + 1.5
    second = await leader_key(cluster)
    assert second not in ("", first)
    # Nothing was re-placed by the handover, and the agents were never cut off long enough to fence.
    assert (await cluster.running_on())["worker"] == ("node-a", pid)
    # The new leader runs failover.
    os.kill(cluster.procs["a"].pid, signal.SIGKILL)
    took = await cluster.until(lambda: cluster.runs_on("worker", "node-b"), timeout=10)
    assert took < 6.0


async def test_a_paused_leader_is_deposed_and_steps_down_when_it_wakes(cluster):
    first = await leader_key(cluster)
    pids = {"kept": await cluster.place_on("kept", "node-a")}
    os.kill(cluster.procs[first].pid, signal.SIGSTOP)
    try:
        # Writes go through once the standby leads (some time out first: the paused process still holds
        # its subscriptions, and NATS hands it a share of the requests until it wakes).
        await place_until_accepted(cluster, "during-pause", "node-b", timeout=TAKEOVER_S + 6)
        assert await leader_key(cluster) not in ("", first)
        await asyncio.sleep(2.0)  # the agents keep asking for assignments meanwhile, and keep running
    finally:
        os.kill(cluster.procs[first].pid, signal.SIGCONT)
    log = cluster.cfg.home / f"{first}.log"
    await cluster.until(lambda: "no longer the scheduler leader" in log.read_text(), timeout=5)
    # Once the old leader has closed its leader connection, every write reaches the new leader at once.
    await asyncio.sleep(1.0)
    for i in range(4):  # (each node takes 4 instances)
        assert await place_until_accepted(cluster, f"after-{i}", ("node-a", "node-b")[i % 2], timeout=2.0) < 1.0
    assert (await cluster.running_on())["kept"] == ("node-a", pids["kept"])


async def test_the_epoch_is_repaired_from_heartbeats_after_redis_lost_it(cluster):
    for i in range(3):
        await cluster.place_on(f"p{i}", "node-a")
    seen = int(await cluster.redis.get(EPOCH_KEY))
    pids = await cluster.running_on()
    # Every scheduler gone, then Redis loses the epoch, the stored heartbeats and the lease.
    for key in ("sched1", "sched2"):
        os.kill(cluster.procs[key].pid, signal.SIGKILL)
        cluster.procs[key].wait()
    await cluster.redis.set(EPOCH_KEY, 0)
    await cluster.redis.delete(NODES_KEY, LEADER_KEY)
    await cluster.start("sched1", "services.scheduler")

    async def repaired() -> bool:
        return int(await cluster.redis.get(EPOCH_KEY) or 0) >= seen

    await cluster.until(repaired, timeout=5)

    async def heard_node_a() -> bool:  # the repair may come from node-b's heartbeat, before node-a's
        try:
            reply = await bus.request(cluster.nc, "magi.sched.nodes", b"{}", NodesReply, timeout=2)
        except MagiError:
            return False
        return any(n.name == "node-a" and n.status == "HEALTHY" for n in reply.nodes)

    await cluster.until(heard_node_a, timeout=10)
    # The agents accept what this leader assigns next (an epoch below theirs would have been ignored)...
    await cluster.place_on("fresh", "node-a")
    # ...and what ran before still runs, untouched.
    running = await cluster.running_on()
    assert all(running[k] == v for k, v in pids.items() if k.startswith("p"))

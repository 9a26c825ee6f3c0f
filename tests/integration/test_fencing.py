"""Nodes fence themselves: the agent's lease, and heartbeats that no stubborn instance can delay.

The scheduler and the agent run in-process against a real nats-server and redis-server on free ports;
the instances are real processes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import msgspec
import psutil
import pytest
import redis.asyncio as aioredis

from protos.node import Heartbeat, NodesReply
from protos.sched import InstanceSpec, PlaceReply, PlaceRequest, ReleaseReply, ReleaseRequest
from services.agent import service as agent_service
from services.agent import supervisor as sup
from services.scheduler import service as scheduler_service
from shared import bus
from shared.config import Settings
from tests.integration.inprocess import Running
from tests.integration.private_stack import agent_servers

pytestmark = pytest.mark.integration

NODE = "fencer"
HEARTBEAT_S = 0.2
LEASE_S = 1.0
SLEEP = "import time; time.sleep(600)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
# Writes what the agent told it into a file, then sleeps.
TELL = "import os, sys, time; open(sys.argv[1], 'w').write(os.environ['MAGI_EPOCH'] + ' ' + os.environ['MAGI_INSTANCE_ID']); time.sleep(600)"
OWN = InstanceSpec(instance_id="own-local", ram_gb=0.0, command=[sys.executable, "-c", SLEEP], restart="always")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with agent_servers(tmp_path_factory.mktemp("fencing"), (NODE,), heartbeat_s=HEARTBEAT_S, agent_lease_s=LEASE_S,
                       sched_lease_s=0.6) as settings:
        yield settings


@pytest.fixture
def bus_stack(servers):
    return servers


@pytest.fixture
async def running(servers):
    client = aioredis.from_url(servers.redis_url)
    await client.flushdb()
    await client.aclose()
    services = Running()
    try:
        yield services
    finally:
        for name in list(services.stops):
            await services.stop(name)


async def until(probe, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(step)


async def instance_pids(nc) -> dict[str, int]:
    msg = await nc.request(f"magi.node.{NODE}.info", b"{}", timeout=5)
    hb = msgspec.json.decode(msg.data, type=Heartbeat)
    return {i.instance_id: i.pid for i in hb.instances if i.state == "running" and i.pid}


async def place(nc, instance_id: str, code: str, *args: str) -> PlaceReply:
    spec = InstanceSpec(instance_id=instance_id, ram_gb=0.1, command=[sys.executable, "-c", code, *args],
                        restart="always")
    reply = await bus.request(nc, "magi.sched.place", PlaceRequest(instances=[spec], placement={instance_id: NODE}),
                              PlaceReply, timeout=5)
    assert reply.placements == {instance_id: NODE}
    return reply


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def start_both(running: Running, settings: Settings, nc) -> None:
    await running.start("scheduler", scheduler_service, settings)
    await running.start("agent", agent_service, settings)
    await until(lambda: _answers(nc))
    await until(lambda: _healthy(nc))  # placement needs the scheduler to have heard the agent first


async def _healthy(nc) -> bool:
    try:
        reply = await bus.request(nc, "magi.sched.nodes", b"{}", NodesReply, timeout=2)
    except Exception:  # no leader in office yet
        return False
    return any(n.name == NODE and n.status == "HEALTHY" for n in reply.nodes)


async def _answers(nc) -> bool:
    try:
        await instance_pids(nc)
        return True
    except Exception:  # a just-started agent's endpoint is not on the server yet
        return False


async def test_an_agent_cut_off_stops_assigned_instances_after_its_lease_and_keeps_its_own(
        servers, running, nc, monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="magi.agent")
    monkeypatch.setattr(agent_service, "own_specs", lambda settings, node: [OWN])
    await start_both(running, servers, nc)
    told = tmp_path / "told"
    placed = await place(nc, "assigned", TELL, str(told))
    pids = await until(lambda: _both_running(nc))
    await until(lambda: _exists(told))
    assert told.read_text() == f"{placed.epoch} assigned"  # MAGI_EPOCH, MAGI_INSTANCE_ID

    await running.stop("scheduler")
    cut = time.monotonic()
    await asyncio.sleep(LEASE_S / 2)
    assert not gone(pids["assigned"])  # within the lease nothing stops
    await until(lambda: _async(gone(pids["assigned"])), timeout=LEASE_S + 5)
    took = time.monotonic() - cut
    # The last reply came up to one interval before the cut; the check runs once an interval after the lease.
    assert LEASE_S - 2 * HEARTBEAT_S <= took <= LEASE_S + 2 * HEARTBEAT_S + 1.0, took
    assert not gone(pids["own-local"])  # the node's own instance is not the scheduler's to fence
    await until(lambda: _without(nc, "assigned"))  # and says so in its next heartbeat

    # The scheduler is back: the agent runs what it assigns again, and its own instance never stopped.
    await running.start("scheduler", scheduler_service, servers)
    again = await until(lambda: _both_running(nc))
    assert again["assigned"] != pids["assigned"] and again["own-local"] == pids["own-local"]
    said = [r.getMessage() for r in caplog.records if r.name == "magi.agent"]
    assert said.count("scheduler unreachable past the agent's lease: stopping assigned instances") == 1
    assert said.count("scheduler reachable again: running what it assigns") == 1  # one line each, not per beat


async def _both_running(nc) -> dict[str, int] | None:
    pids = await instance_pids(nc)
    return pids if {"assigned", "own-local"} <= pids.keys() else None


async def _without(nc, instance_id: str) -> bool:
    return instance_id not in await instance_pids(nc)


async def _exists(path) -> bool:
    return path.exists() and path.stat().st_size > 0


async def _async(value):
    return value


async def test_an_instance_that_ignores_sigterm_does_not_delay_heartbeats(servers, running, nc, monkeypatch):
    monkeypatch.setattr(sup, "STOP_GRACE_S", 2.0)
    await start_both(running, servers, nc)
    lines = await nc.subscribe(f"magi.node.{NODE}.logs.stubborn")
    await place(nc, "stubborn", STUBBORN)
    await lines.next_msg(timeout=10)  # its SIGTERM handler is in place
    pid = (await until(lambda: instance_pids(nc)))["stubborn"]

    beats: list[float] = []

    async def heard(msg) -> None:
        beats.append(time.monotonic())

    sub = await nc.subscribe(f"magi.node.{NODE}.heartbeat", cb=heard)
    released = time.monotonic()
    await bus.request(nc, "magi.sched.release", ReleaseRequest(instance_ids=["stubborn"]), ReleaseReply, timeout=5)
    await until(lambda: _async(gone(pid)), timeout=10)
    stopped = time.monotonic()
    await asyncio.sleep(2 * HEARTBEAT_S)
    await sub.unsubscribe()
    assert stopped - released >= 1.8  # it really ignored SIGTERM and waited for SIGKILL
    during = [t for t in beats if t <= stopped + HEARTBEAT_S]
    gaps = [b - a for a, b in zip([released, *during], during)]
    assert len(during) >= (stopped - released) / HEARTBEAT_S * 0.7
    assert max(gaps) < 3 * HEARTBEAT_S, gaps  # the scheduler's failover grace was never reached
    nodes = msgspec.json.decode((await nc.request("magi.sched.nodes", b"{}", timeout=5)).data, type=NodesReply)
    assert [n.status for n in nodes.nodes if n.name == NODE] in (["HEALTHY"], ["DEGRADED"])

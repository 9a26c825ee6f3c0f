"""Node agent and scheduler in-process against a real nats-server and redis-server on free ports."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import msgspec
import psutil
import pytest
import redis.asyncio as aioredis
from nats.errors import NoRespondersError
from nats.micro.request import ERROR_CODE_HEADER

from magi import stack
from protos.node import ClusterReport, Heartbeat, NodesReply
from services.agent import service as agent_service
from services.scheduler import service as scheduler_service
from services.scheduler.state import NODES_KEY
from shared.config import Settings
from tests.integration.inprocess import Running
from tests.integration.private_stack import agent_servers

pytestmark = pytest.mark.integration

NODE = "testnode"
HEARTBEAT_S = 0.2
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """NATS and Redis from the local stack's own code, with no MAGI service: they run in-process here."""
    with agent_servers(tmp_path_factory.mktemp("agent-sched"), (NODE, "x"), heartbeat_s=HEARTBEAT_S) as settings:
        yield settings


@pytest.fixture
async def rds(servers):
    client = aioredis.from_url(servers.redis_url)
    await client.flushdb()  # every test starts from an empty registry
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def bus_stack(servers):
    return servers


@pytest.fixture
async def running(servers, rds):
    services = Running()
    try:
        yield services
    finally:
        await services.stop_all()


async def _request(nc, subject: str, payload: bytes = b"{}"):
    """A request that waits out a just-started service's subscriptions reaching the server.

    nats-py 2.16's flush() writes its PING straight to the socket, ahead of SUBs still queued for the
    flusher task, so MagiService.start() can return a moment before its endpoints exist on the server.
    """
    deadline = time.monotonic() + 2.0
    while True:
        try:
            return await nc.request(subject, payload, timeout=5)
        except NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def _nodes(nc) -> dict[str, object]:
    msg = await _request(nc, "magi.sched.nodes")
    return {n.name: n for n in msgspec.json.decode(msg.data, type=NodesReply).nodes}


async def _until(probe, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


async def _wait_status(nc, status: str, timeout: float = 10.0):
    async def probe():
        node = (await _nodes(nc)).get(NODE)
        return node if node is not None and node.status == status else None

    return await _until(probe, timeout)


def _expected_health(hb: Heartbeat) -> str:
    # This machine's own RAM or disk may be over 90 %; then the agent says DEGRADED, and so must the scheduler.
    return "DEGRADED" if hb.ram_percent > 90 or hb.disk_percent > 90 else "HEALTHY"


async def _start_both(running: Running, settings: Settings, nc):
    await running.start("scheduler", scheduler_service, settings)
    await running.start("agent", agent_service, settings)
    info = await _request(nc, f"magi.node.{NODE}.info", b"")
    expected = _expected_health(msgspec.json.decode(info.data, type=Heartbeat))
    node = await _wait_status(nc, expected)
    assert node is not None, f"{NODE} never became {expected}: {await _nodes(nc)}"
    return node


async def test_heartbeats_reach_the_scheduler_with_real_figures(servers, running, nc, rds):
    node = await _start_both(running, servers, nc)
    hb = node.heartbeat
    real_total = psutil.virtual_memory().total / 1024**3
    assert hb.ram_total_gb == pytest.approx(real_total, abs=0.01)
    assert 0 < hb.ram_used_gb <= hb.ram_total_gb and hb.cpu_count == psutil.cpu_count()
    assert hb.disk_total_gb > 0 and hb.seq >= 1 and 0 <= node.last_seen_s < 3 * HEARTBEAT_S

    info = await _request(nc, f"magi.node.{NODE}.info")
    assert msgspec.json.decode(info.data, type=Heartbeat).node == NODE

    stored = await rds.hget(NODES_KEY, NODE)
    assert stored is not None and msgspec.json.decode(stored, type=Heartbeat).node == NODE


async def test_report_has_the_seed_shape(servers, running, nc):
    await _start_both(running, servers, nc)
    msg = await _request(nc, "magi.sched.report", b"")
    raw = json.loads(msg.data)
    assert set(raw) == {"timestamp", "total_nodes", "total_instances", "nodes", "warnings"}
    assert set(raw["nodes"][0]) == {"name", "status", "instances", "max_instances", "ram_allocated_gb",
                                    "ram_total_gb", "ram_utilization_percent", "gpu"}
    report = msgspec.json.decode(msg.data, type=ClusterReport)
    [node] = report.nodes
    assert (report.total_nodes, report.total_instances, node.name, node.max_instances) == (1, 0, NODE, 4)
    assert node.status in ("healthy", "degraded") and node.ram_total_gb > 0
    assert node.ram_utilization_percent == round(100 * node.ram_allocated_gb / node.ram_total_gb, 2)


async def test_a_stopped_agent_becomes_unavailable_within_a_second(servers, running, nc):
    await _start_both(running, servers, nc)
    await running.stop("agent")
    stopped = time.monotonic()
    node = await _wait_status(nc, "UNAVAILABLE", timeout=3.0)
    assert node is not None, await _nodes(nc)
    assert time.monotonic() - stopped < 1.5  # 3 x 0.2 s of silence, plus polling and a loaded machine
    report = msgspec.json.decode((await _request(nc, "magi.sched.report")).data, type=ClusterReport)
    assert report.nodes[0].status == "unavailable"
    assert any(w.startswith(f"node {NODE} is unavailable (last seen ") for w in report.warnings)


async def test_a_restarted_scheduler_lists_known_nodes_as_unavailable(servers, running, nc):
    await _start_both(running, servers, nc)
    await running.stop("agent")
    await running.stop("scheduler")
    await running.start("scheduler", scheduler_service, servers)
    node = (await _nodes(nc))[NODE]
    assert (node.status, node.last_seen_s) == ("UNAVAILABLE", None)


async def test_bad_requests_get_400_and_garbage_heartbeats_are_dropped(servers, running, nc):
    await _start_both(running, servers, nc)
    for subject in ("magi.sched.nodes", "magi.sched.report", f"magi.node.{NODE}.info"):
        msg = await _request(nc, subject, b"{bad")
        assert msg.headers and msg.headers.get(ERROR_CODE_HEADER) == "400", subject
        assert json.loads(msg.data)["error"]["field"] == "$"

    # Sent as node x's own agent (the only identity nats-server lets publish there): the scheduler must
    # still drop what is malformed, or names another node, or claims an interval beyond the 60 s bound.
    agent_x = await stack.connect_as(servers.home, servers.nats_url, "agent-x")
    spoof = msgspec.json.encode(Heartbeat(node="y", seq=1, sent_at=0.0))
    lazy = json.dumps({"node": "x", "seq": 1, "sent_at": 0.0, "interval_s": 1e308}).encode()
    for payload in (b"{bad", b"[]", b"", b'{"node": 5}', b"\xff\xfe", spoof, lazy):
        await agent_x.publish("magi.node.x.heartbeat", payload)
    await agent_x.flush()
    await agent_x.close()
    await asyncio.sleep(3 * HEARTBEAT_S)
    nodes = await _nodes(nc)
    assert set(nodes) == {NODE} and nodes[NODE].status in ("HEALTHY", "DEGRADED")


async def test_an_unsafe_node_name_is_refused_at_start(servers):
    from shared.errors import BadRequest

    bad = msgspec.structs.replace(servers, node_name="host.example.org")
    with pytest.raises(BadRequest, match="MAGI_NODE_NAME"):
        await agent_service.build(bad)


async def test_an_instance_the_nodes_policy_refuses_is_reported_not_run(servers, running, nc):
    from protos.sched import InstanceSpec, PlaceReply, PlaceRequest

    await _start_both(running, servers, nc)
    spec = InstanceSpec(instance_id="evil", ram_gb=0.1, command=["sh", "-c", "sleep 60"], restart="always")
    request = msgspec.json.encode(PlaceRequest(instances=[spec], placement={"evil": NODE}))
    placed = msgspec.json.decode((await _request(nc, "magi.sched.place", request)).data, type=PlaceReply)
    assert placed.placements == {"evil": NODE}

    async def refused():
        report = msgspec.json.decode((await _request(nc, "magi.sched.report")).data, type=ClusterReport)
        return [w for w in report.warnings if w.startswith("instance evil was refused by testnode's agent")]

    [warning] = await _until(refused)
    assert "is not allowed by" in warning and str(servers.agent_policy) in warning
    hb = msgspec.json.decode((await _request(nc, f"magi.node.{NODE}.info")).data, type=Heartbeat)
    [status] = [i for i in hb.instances if i.instance_id == "evil"]
    assert status.state == "refused" and status.pid is None
    assert not any("sleep 60" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))

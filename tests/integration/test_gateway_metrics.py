"""`/metrics` against the session stack: counts move by exactly what was done, and NATS's monitoring
port listens on loopback only."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from magi import stack
from protos.infer import GenerateReply, GenerateRequest
from protos.mission import SUBMIT_SUBJECT, MissionGet, MissionReply, MissionRequest
from shared import bus, errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "smollm2-135m"
GENERATE = dict(service="magi-inference", endpoint="magi.infer.generate")


def _get(gateway_url: str, path: str, key: str | None) -> tuple[int, str, str]:
    url = urlparse(gateway_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read().decode()
    finally:
        conn.close()


async def _scrape(gateway_url: str, key: str) -> list:
    status, content_type, text = await asyncio.to_thread(_get, gateway_url, "/metrics", key)
    assert status == 200 and content_type.startswith("text/plain"), (status, text[:300])
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _sum(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _has(samples, name: str, **labels) -> bool:
    return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in samples)


async def test_metrics_need_the_api_key(gateway_url, api_key):
    for key in (None, "not-the-key"):
        status, content_type, text = await asyncio.to_thread(_get, gateway_url, "/metrics", key)
        assert status == 401 and content_type == "application/json" and json.loads(text)["error"]["code"]
    samples = await _scrape(gateway_url, api_key)
    # The refusals above count under the route's own label, never the raw path.
    assert _sum(samples, "magi_http_requests_total", route="/metrics", method="GET", code="401") >= 2
    assert _sum(samples, "magi_http_errors_total", route="/metrics", method="GET") >= 2


async def test_requests_errors_latency_and_tokens_move_by_what_was_done(nc, gateway_url, api_key):
    before = await _scrape(gateway_url, api_key)
    tokens = 0
    for i in range(3):
        reply = await bus.request(nc, "magi.infer.generate",
                                  GenerateRequest(model=MODEL, prompt=f"Count to {i + 2}.", max_tokens=6, temperature=0),
                                  GenerateReply, timeout=120)
        tokens += reply.usage.completion_tokens
    with pytest.raises(errors.NotFound):
        await bus.request(nc, "magi.infer.generate", GenerateRequest(model="no-such-model", prompt="x"), GenerateReply,
                          timeout=30)
    after = await _scrape(gateway_url, api_key)

    def moved(name: str, **labels) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    assert moved("magi_endpoint_requests_total", **GENERATE) == 4
    assert moved("magi_endpoint_errors_total", **GENERATE) == 1
    assert moved("magi_endpoint_latency_seconds_count", **GENERATE) == 4
    # The histogram counts exactly the requests, and a generation takes more than the first bucket.
    assert _sum(after, "magi_endpoint_latency_seconds_count", **GENERATE) == _sum(after, "magi_endpoint_requests_total",
                                                                                  **GENERATE)
    assert moved("magi_endpoint_latency_seconds_bucket", le="+Inf", **GENERATE) == 4
    assert moved("magi_endpoint_latency_seconds_sum", **GENERATE) > 0.01
    assert tokens > 0 and moved("magi_tokens_generated_total", model=MODEL) == tokens
    assert moved("magi_inference_requests_total", model=MODEL) == 3
    assert _has(after, "magi_inference_queue_depth", model=MODEL)
    assert _sum(after, "magi_inference_ready_replicas", model=MODEL) >= 1
    assert any(s.value > 0 for s in after if s.name == "magi_tokens_per_second" and s.labels["model"] == MODEL)
    assert _sum(after, "magi_service_instances", service="magi-inference") == 1
    assert _sum(after, "magi_metrics_source_up", source="stats") == 1
    assert _sum(after, "magi_metrics_scrape_seconds") < 1.5  # bounded, and early once everyone answered


async def test_nodes_from_heartbeats_and_the_placement_epoch(gateway_url, api_key):
    samples = await _scrape(gateway_url, api_key)
    assert _sum(samples, "magi_node_up", node="testnode") == 1
    assert _sum(samples, "magi_node_health", node="testnode", health="HEALTHY") == 1
    assert _sum(samples, "magi_node_ram_bytes", node="testnode", kind="total") > 2**28
    assert 0 < _sum(samples, "magi_node_ram_bytes", node="testnode", kind="used") < _sum(
        samples, "magi_node_ram_bytes", node="testnode", kind="total")
    assert 0 <= _sum(samples, "magi_node_heartbeat_age_seconds", node="testnode") < 5
    assert _sum(samples, "magi_placement_epoch") >= 1  # the inference replicas were placed
    assert _sum(samples, "magi_scheduler_leader") == 1
    assert _sum(samples, "magi_metrics_source_up", source="scheduler") == 1


async def test_a_service_gone_costs_its_series_never_the_scrape(nc, gateway_url, api_key):
    fake = {"type": "io.nats.micro.v1.stats_response", "name": "magi-fake", "id": "fake1", "endpoints": [
        {"name": "x", "subject": "magi.fake.x", "num_requests": 7, "num_errors": 0, "data": {}}]}

    async def answer(msg) -> None:
        await nc.publish(msg.reply, json.dumps(fake).encode())

    async def garbage(msg) -> None:
        await nc.publish(msg.reply, b"not a stats reply")

    subs = [await nc.subscribe("$SRV.STATS", cb=answer), await nc.subscribe("$SRV.STATS", cb=garbage)]
    await nc.flush()
    samples = await _scrape(gateway_url, api_key)
    assert _sum(samples, "magi_endpoint_requests_total", service="magi-fake", endpoint="magi.fake.x") == 7
    for sub in subs:
        await sub.unsubscribe()
    await nc.flush()
    # One instance fewer than last time: the scrape waits out its bound for it, then answers without it.
    samples = await _scrape(gateway_url, api_key)
    assert not _has(samples, "magi_endpoint_requests_total", service="magi-fake")
    assert 0.9 <= _sum(samples, "magi_metrics_scrape_seconds") < 2.0
    assert _sum(samples, "magi_service_instances", service="magi-inference") == 1
    samples = await _scrape(gateway_url, api_key)  # and the next scrape is quick again
    assert _sum(samples, "magi_metrics_scrape_seconds") < 0.9


async def _until_moved(gateway_url: str, key: str, name: str, labels: dict, by: float, was: float) -> float:
    """The desk answers once the result is stored; the orchestrator counts a moment later."""
    for _ in range(40):
        now = _sum(await _scrape(gateway_url, key), name, **labels)
        if now >= was + by:
            return now - was
        await asyncio.sleep(0.25)
    return now - was


async def test_missions_count_by_outcome(nc, gateway_url, api_key):
    before = await _scrape(gateway_url, api_key)
    ok, rejected = (_sum(before, "magi_missions_total", outcome=o) for o in ("ok", "rejected"))
    mission = MissionRequest(prompt="Name a primary colour.", variations=["in one word"], max_tokens=8,
                             consensus="medoid")
    await bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=150)
    assert await _until_moved(gateway_url, api_key, "magi_missions_total", {"outcome": "ok"}, 1, ok) == 1
    # Garbage on the submit queue is settled as a 400 at once, never retried: "rejected".
    mission_id = f"metrics-{uuid.uuid4().hex[:12]}"
    await nc.jetstream().publish(SUBMIT_SUBJECT, b"not a mission", headers={"Nats-Msg-Id": mission_id})
    assert await _until_moved(gateway_url, api_key, "magi_missions_total", {"outcome": "rejected"}, 1, rejected) == 1
    after = await _scrape(gateway_url, api_key)
    assert _sum(after, "magi_missions_total", outcome="ok") == ok + 1  # the rejected one is not an ok one
    with pytest.raises(errors.BadRequest):
        await bus.request(nc, "magi.mission.get", MissionGet(mission_id=mission_id), MissionReply, timeout=10)


def test_nats_monitoring_answers_on_loopback_and_nothing_else(magi_stack):
    assert magi_stack.nats_monitor_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{magi_stack.nats_monitor_url}/varz", timeout=5) as response:
        varz = json.loads(response.read())
    assert varz["server_id"] and varz["connections"] >= 5  # every service of the stack is connected
    port = urlparse(magi_stack.nats_monitor_url).port
    nats_pid = next(c.pid for c in (stack.read_state(Path(magi_stack.home)) or magi_stack).components
                    if c.name == "nats")  # the keeper's state: a restarted nats-server has a new pid
    listening = [c.laddr for c in psutil.Process(nats_pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening

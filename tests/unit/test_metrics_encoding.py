"""Latency histograms in `$SRV.STATS` and the metric families `/metrics` builds from them: pure, no servers."""

from __future__ import annotations

import pytest
from nats.micro.service import EndpointStats
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from protos.common import Empty
from protos.node import GpuInfo, Heartbeat, InstanceStatus
from services.gateway.metric_families import METRIC_NAMES, NodeSeen, RouteStats, Snapshot, build, node_status
from services.gateway.metrics import HttpMetrics
from shared.config import Settings
from shared.histogram import BUCKETS_S, Histogram, cumulative
from shared.service import EndpointCounters, MagiService

pytestmark = pytest.mark.unit


def test_a_value_on_a_bound_counts_in_that_bucket_and_the_encoding_round_trips():
    h = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.1000001, 1.0, 7.0, -3.0):  # a negative time (a clock step) counts as 0
        h.observe(seconds)
    assert h.counts == [3, 2, 1] and h.count == 6
    buckets, total_s, count = cumulative(h.encode())
    assert buckets == [("0.1", 3.0), ("1.0", 5.0), ("+Inf", 6.0)]
    assert count == 6 and total_s == pytest.approx(0.05 + 0.1 + 0.1000001 + 1.0 + 7.0)


@pytest.mark.parametrize("bad", [{}, {"le": [1.0], "counts": [1], "sum_s": 0},  # one count short
                                 {"le": [2.0, 1.0], "counts": [0, 0, 0], "sum_s": 0},  # bounds fall
                                 {"le": [1.0], "counts": [-1, 2], "sum_s": 0}, {"le": "x", "counts": [], "sum_s": 0}])
def test_a_malformed_histogram_is_refused_not_exported(bad):
    with pytest.raises(ValueError):
        cumulative(bad)


def test_endpoint_counters_time_every_finished_request_into_the_histogram():
    c = EndpointCounters()
    for ms in (2, 40, 40, 3000):
        c.finished(ms * 1_000_000)
    assert c.requests == 4 and c.latency.count == 4 and c.processing_ns == 3082 * 1_000_000
    assert c.latency.counts[BUCKETS_S.index(0.005)] == 1 and c.latency.counts[BUCKETS_S.index(5.0)] == 1


def test_stats_data_carries_the_histogram_and_survives_a_broken_service_figure():
    service = MagiService("magi-test", "0.0.1", "test", Settings())

    async def handler(_req, _ctx):
        return Empty()

    service.endpoint("magi.test.echo", Empty, handler)
    service._endpoints[0].counters.finished(20_000_000)
    service.extra_stats = lambda: {"queue": 3, "errors": "a service may not overwrite the endpoint's own"}
    data = service._stats(_endpoint_stats())
    assert data["queue"] == 3 and data["errors"] == 0 and data["in_flight"] == 0
    assert cumulative(data["latency"])[2] == 1

    def broken():
        raise RuntimeError("a figure that cannot be read")

    service.extra_stats = broken
    data = service._stats(_endpoint_stats())
    assert cumulative(data["latency"])[2] == 1 and "queue" not in data


def _endpoint_stats() -> EndpointStats:
    return EndpointStats(name="echo", subject="magi.test.echo", queue_group="q", num_requests=0, num_errors=0,
                         processing_time=0, average_processing_time=0)


def _stats_reply(name: str, sid: str, endpoints: list[tuple[str, int, int, list[float]]], extra: dict) -> dict:
    out = []
    for subject, requests, errors, times in endpoints:
        h = Histogram()
        for t in times:
            h.observe(t)
        out.append({"name": subject.rsplit(".", 1)[1], "subject": subject, "num_requests": requests, "num_errors": errors,
                    "data": {**extra, "in_flight": 1, "errors": errors, "latency": h.encode()}})
    return {"type": "io.nats.micro.v1.stats_response", "name": name, "id": sid, "endpoints": out}


def _scrape(snap: Snapshot) -> dict[str, list]:
    """The families as Prometheus would read them: exposition text, parsed back."""

    class One:
        def collect(self):
            return build(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples, metric: str, **labels) -> float:
    found = [s.value for s in samples if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (metric, labels, found)
    return found[0]


def test_families_from_stats_heartbeats_and_http():
    inference = _stats_reply("magi-inference", "inf1", [("magi.infer.generate", 3, 1, [0.2, 0.3, 4.0])], {
        "models": {"smollm2": {"queued": 2, "ready": 2}}, "cancelled": 1,
        "replicas": [{"model": "smollm2", "replica": "smollm2/0", "node": "n1", "state": "ready", "in_flight": 1,
                      "served": 9, "tokens": 120, "tokens_per_s": 41.5, "utilisation": 0.25}]})
    orchestrator = _stats_reply("magi-orchestrator", "orc1", [("magi.mission.run", 2, 0, [1.0, 2.0])],
                                {"missions": {"ok": 5, "failed": 1}, "mission_retries": 2, "missions_running": 1})
    # Two schedulers serve the same subject: the instance id keeps their series apart; a standby lags.
    leader = _stats_reply("magi-scheduler", "s1", [("magi.sched.nodes", 4, 0, [0.001] * 4)],
                          {"placement_epoch": 7, "leading": True})
    standby = _stats_reply("magi-scheduler", "s2", [("magi.sched.nodes", 1, 0, [0.001])],
                           {"placement_epoch": 5, "leading": False})
    hb = Heartbeat(node="n1", seq=4, sent_at=0.0, ram_total_gb=16.0, ram_used_gb=4.0, cpu_percent=12.5, load_1m=0.5,
                   disk_total_gb=100.0, disk_percent=25.0, gpus=[GpuInfo(name="H100", memory_total_gb=80.0,
                                                                           memory_used_gb=8.0)],
                   instances=[InstanceStatus(instance_id="a", state="running"),
                              InstanceStatus(instance_id="b", state="running")])
    stale = Heartbeat(node="n2", seq=1, sent_at=0.0, interval_s=1.0)
    snap = Snapshot(stats=[inference, orchestrator, leader, standby],
                    nodes={"n1": NodeSeen(heartbeat=hb, age_s=0.4), "n2": NodeSeen(heartbeat=stale, age_s=60.0)},
                    gateway={"in_flight": 2, "rejected": 3, "streams": 4, "cancelled": 5},
                    sources={"stats": True, "scheduler": False}, scrape_s=0.02)
    snap.http[("/v1/models", "GET")] = rs = RouteStats()  # what the middleware fills in
    rs.observe(200, 0.01)
    rs.observe(401, 0.001)
    m = _scrape(snap)
    assert set(m) == set(METRIC_NAMES)  # every family, always
    ep = dict(service="magi-inference", service_id="inf1", endpoint="magi.infer.generate")
    assert _value(m["magi_endpoint_requests"], "magi_endpoint_requests_total", **ep) == 3
    assert _value(m["magi_endpoint_errors"], "magi_endpoint_errors_total", **ep) == 1
    lat = m["magi_endpoint_latency_seconds"]
    assert _value(lat, "magi_endpoint_latency_seconds_count", **ep) == 3
    assert _value(lat, "magi_endpoint_latency_seconds_bucket", le="0.25", **ep) == 1
    assert _value(lat, "magi_endpoint_latency_seconds_bucket", le="+Inf", **ep) == 3
    assert _value(lat, "magi_endpoint_latency_seconds_sum", **ep) == pytest.approx(4.5)
    assert _value(m["magi_endpoint_requests"], "magi_endpoint_requests_total", service_id="s2",
                  endpoint="magi.sched.nodes") == 1
    assert _value(m["magi_service_instances"], "magi_service_instances", service="magi-scheduler") == 2
    assert _value(m["magi_placement_epoch"], "magi_placement_epoch") == 7
    assert _value(m["magi_scheduler_leader"], "magi_scheduler_leader", service_id="s1") == 1
    assert _value(m["magi_inference_queue_depth"], "magi_inference_queue_depth", model="smollm2") == 2
    rep = dict(model="smollm2", replica="smollm2/0", node="n1")
    assert _value(m["magi_tokens_generated"], "magi_tokens_generated_total", **rep) == 120
    assert _value(m["magi_tokens_per_second"], "magi_tokens_per_second", **rep) == 41.5
    assert _value(m["magi_inference_in_flight"], "magi_inference_in_flight", **rep) == 1
    assert _value(m["magi_inference_replica_ready"], "magi_inference_replica_ready", state="ready", **rep) == 1
    assert _value(m["magi_missions"], "magi_missions_total", outcome="ok") == 5
    assert _value(m["magi_missions"], "magi_missions_total", outcome="failed") == 1
    assert _value(m["magi_node_up"], "magi_node_up", node="n1") == 1
    assert _value(m["magi_node_up"], "magi_node_up", node="n2") == 0  # silent past the failover grace
    assert _value(m["magi_node_health"], "magi_node_health", node="n2", health="UNAVAILABLE") == 1
    assert _value(m["magi_node_ram_bytes"], "magi_node_ram_bytes", node="n1", kind="total") == 16 * 1024**3
    assert _value(m["magi_node_disk_bytes"], "magi_node_disk_bytes", node="n1", kind="used") == 25 * 1024**3
    assert _value(m["magi_node_gpu_memory_bytes"], "magi_node_gpu_memory_bytes", node="n1", gpu="0", kind="used",
                  name="H100") == 8 * 1024**3
    assert _value(m["magi_node_instances"], "magi_node_instances", node="n1", state="running") == 2
    assert _value(m["magi_http_requests"], "magi_http_requests_total", route="/v1/models", code="401") == 1
    assert _value(m["magi_http_errors"], "magi_http_errors_total", route="/v1/models") == 1
    assert _value(m["magi_http_request_duration_seconds"], "magi_http_request_duration_seconds_count",
                  route="/v1/models") == 2
    assert _value(m["magi_gateway_rejected"], "magi_gateway_rejected_total") == 3
    assert _value(m["magi_metrics_source_up"], "magi_metrics_source_up", source="scheduler") == 0


def test_a_service_of_another_kind_without_magi_data_still_counts():
    other = {"name": "someone-else", "id": "x", "endpoints": [
        {"name": "e", "subject": "other.e", "num_requests": 4, "num_errors": 0, "data": None},
        {"name": "f", "subject": "other.f", "num_requests": 1, "num_errors": 0, "data": {"latency": {"le": "bad"}}}]}
    m = _scrape(Snapshot(stats=[other]))
    assert _value(m["magi_endpoint_requests"], "magi_endpoint_requests_total", endpoint="other.e") == 4
    assert m["magi_endpoint_latency_seconds"] == [] and m["magi_placement_epoch"] == []


def test_node_status_prefers_the_scheduler_and_otherwise_applies_the_failover_grace():
    hb = Heartbeat(node="n", seq=1, sent_at=0.0, health="DEGRADED")
    assert node_status(NodeSeen(heartbeat=hb, age_s=2.9), heartbeat_s=1.0) == "DEGRADED"
    assert node_status(NodeSeen(heartbeat=hb, age_s=3.1), heartbeat_s=1.0) == "UNAVAILABLE"
    assert node_status(NodeSeen(heartbeat=hb, age_s=99.0, status="HEALTHY"), heartbeat_s=1.0) == "HEALTHY"
    assert node_status(NodeSeen(heartbeat=None, age_s=None), heartbeat_s=1.0) == "UNAVAILABLE"


async def test_http_middleware_labels_by_route_template_never_by_raw_path():
    async def hello(_request):
        return PlainTextResponse("hi")

    async def boom(_request):
        raise RuntimeError("unexpected")

    routes: dict = {}
    app = Starlette(routes=[Route("/hello/{name}", hello), Route("/boom", boom)],
                    middleware=[Middleware(HttpMetrics, routes=routes)])

    async def call(path: str, method: str = "GET") -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [], "scheme": "http", "server": ("t", 80), "root_path": "", "http_version": "1.1"}
        try:
            await app(scope, receive, send)
        except RuntimeError:
            pass  # the server answers 500 for what the app raised
        return next((m["status"] for m in sent if m["type"] == "http.response.start"), 500)

    assert await call("/hello/a") == 200 and await call("/hello/b") == 200
    assert await call("/nowhere/1") == 404 and await call("/nowhere/2") == 404
    assert await call("/boom") == 500
    assert await call("/hello/x", "BREW") == 405
    assert set(routes) == {("/hello/{name}", "GET"), ("unmatched", "GET"), ("/boom", "GET"), ("/hello/{name}", "OTHER")}
    assert routes[("/hello/{name}", "GET")].codes == {200: 2} and routes[("/hello/{name}", "GET")].errors == 0
    assert routes[("unmatched", "GET")].codes == {404: 2} and routes[("/boom", "GET")].codes == {500: 1}
    assert routes[("/hello/{name}", "GET")].latency.count == 2

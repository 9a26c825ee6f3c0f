"""What `/metrics` says: Prometheus metric families built from one gathered `Snapshot`.

Pure functions over plain data (no bus, no clock), so every family can be built and checked without a
stack. Every family is always emitted, with or without samples, so `METRIC_NAMES` is exactly what a
scrape can contain (the Grafana dashboard's test holds its queries to it).

Labels: `service` is a micro service's name (`magi-inference`), `service_id` the instance's id (several
schedulers or orchestrators may run), `endpoint` the NATS subject it serves. Everything read from a
service's `$SRV.STATS` carries `service_id`, so two instances never produce the same series; sum over it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from protos.node import Heartbeat
from shared.config import FAILOVER_MISSED_BEATS
from shared.histogram import Histogram, cumulative

log = logging.getLogger("magi.gateway.metrics")

GIB = 1024**3  # heartbeats report GiB (`*_gb` fields are psutil bytes / 1024**3)
HEALTH_STATES = ("HEALTHY", "DEGRADED", "UNAVAILABLE", "MAINTENANCE")


@dataclass
class RouteStats:
    """One gateway HTTP route and method: responses by status code, and their latency."""

    codes: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # status 400 and above (499: the client went away)
    latency: Histogram = field(default_factory=Histogram)

    def observe(self, status: int, seconds: float) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1
        self.errors += status >= 400
        self.latency.observe(seconds)


@dataclass
class NodeSeen:
    """A node as the gateway knows it: its newest heartbeat, how old that is, the scheduler's verdict."""

    heartbeat: Heartbeat | None
    age_s: float | None
    status: str | None = None  # the scheduler's (`magi.sched.nodes`), when it answered


@dataclass
class Snapshot:
    stats: list[dict] = field(default_factory=list)  # `$SRV.STATS` replies, one per service instance
    nodes: dict[str, NodeSeen] = field(default_factory=dict)
    http: dict[tuple[str, str], RouteStats] = field(default_factory=dict)  # (route, method) -> stats
    gateway: dict[str, int] = field(default_factory=dict)  # the gateway's own counters (app.Counters)
    heartbeat_s: float = 1.0  # the stack's heartbeat interval, for nodes whose heartbeat does not say
    sources: dict[str, bool] = field(default_factory=dict)  # what answered this scrape: stats, scheduler
    scrape_s: float = 0.0


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class _Families:
    """Every family `/metrics` can contain, created empty; `build` fills them from a snapshot."""

    def __init__(self) -> None:
        ep = ["service", "service_id", "endpoint"]
        rep = ["service_id", "model", "replica", "node"]
        http = ["route", "method"]
        # NATS micro endpoints of every service, from `$SRV.STATS`.
        self.ep_requests = _counter("magi_endpoint_requests_total", "Requests an endpoint finished (answered or failed)", ep)
        self.ep_errors = _counter("magi_endpoint_errors_total", "Requests an endpoint answered with an error", ep)
        self.ep_in_flight = _gauge("magi_endpoint_in_flight", "Requests an endpoint is working on now", ep)
        self.ep_latency = HistogramMetricFamily("magi_endpoint_latency_seconds",
                                                "Time from a request's receipt to its reply going out", labels=ep)
        self.instances = _gauge("magi_service_instances", "Instances of a service that answered $SRV.STATS (a scheduler leader counts twice: its "
                                "writes are an instance of their own)", ["service"])
        # Inference.
        self.queue = _gauge("magi_inference_queue_depth", "Requests waiting for a free replica of a model",
                            ["service_id", "model"])
        self.refused = _counter("magi_inference_refused_total",
                                "Requests a model refused at once (503) because its queue was full (max_queue)",
                                ["service_id", "model"])
        self.ready = _gauge("magi_inference_ready_replicas", "Replicas of a model ready to serve", ["service_id", "model"])
        self.in_flight = _gauge("magi_inference_in_flight", "Requests a replica is serving now", rep)
        self.served = _counter("magi_inference_requests_total", "Requests a replica finished", rep)
        self.tokens = _counter("magi_tokens_generated_total", "Tokens a replica generated", rep)
        self.rate = _gauge("magi_tokens_per_second",
                           "A replica's generation speed while busy (tokens over busy seconds, since it started)", rep)
        self.util = _gauge("magi_inference_utilisation", "Share of a replica's ready time spent serving", rep)
        self.up = _gauge("magi_inference_replica_ready", "1 when a replica is ready, else 0 (starting, restarting, failed)",
                         [*rep, "state"])
        self.cancelled = _counter("magi_inference_cancelled_total", "Generations cancelled by request id", ["service_id"])
        # Missions (orchestrator) and placement (scheduler).
        self.missions = _counter("magi_missions_total", "Missions settled, by outcome (ok, rejected, deadline, failed)",
                                 ["service_id", "outcome"])
        self.retries = _counter("magi_mission_retries_total", "Mission attempts failed and retried", ["service_id"])
        self.missions_refused = _counter("magi_missions_refused_total", "Missions refused at once (503) because "
                                         "MAGI_MISSION_MAX_PENDING were queued or running", ["service_id"])
        self.running = _gauge("magi_missions_running", "Missions an orchestrator is running now", ["service_id"])
        self.epoch = _gauge("magi_placement_epoch", "The placement epoch (the highest any scheduler reports)", [])
        self.leader = _gauge("magi_scheduler_leader", "1 for the scheduler that holds the leader lease", ["service_id"])
        # Nodes, from heartbeats and the scheduler's view of them.
        self.node_up = _gauge("magi_node_up", "1 while a node's heartbeats arrive (its status is not UNAVAILABLE)",
                              ["node"])
        self.node_health = _gauge("magi_node_health", "1 for a node's current status, 0 for the others",
                                  ["node", "health"])
        self.node_age = _gauge("magi_node_heartbeat_age_seconds", "Seconds since a node's newest heartbeat", ["node"])
        self.ram = _gauge("magi_node_ram_bytes", "A node's RAM: total and used", ["node", "kind"])
        self.cpu = _gauge("magi_node_cpu_percent", "A node's CPU use, percent of all cores", ["node"])
        self.load = _gauge("magi_node_load1", "A node's 1-minute load average", ["node"])
        self.disk = _gauge("magi_node_disk_bytes", "A node's data disk: total and used", ["node", "kind"])
        self.gpu = _gauge("magi_node_gpu_memory_bytes", "A node's GPU memory: total and used, per GPU",
                          ["node", "gpu", "name", "kind"])
        self.node_instances = _gauge("magi_node_instances", "Instances on a node by state, as its agent reports",
                                     ["node", "state"])
        # The gateway itself.
        self.http_requests = _counter("magi_http_requests_total", "HTTP responses by route, method and status code",
                                      [*http, "code"])
        self.http_errors = _counter("magi_http_errors_total", "HTTP responses with status 400 or above", http)
        self.http_latency = HistogramMetricFamily("magi_http_request_duration_seconds",
                                                  "Time from an HTTP request to the end of its response (a stream's end)",
                                                  labels=http)
        self.gw_in_flight = _gauge("magi_gateway_in_flight", "API requests in flight (streams until they end)", [])
        self.gw_rejected = _counter("magi_gateway_rejected_total", "API requests refused with 429 (over the limit)", [])
        self.gw_streams = _counter("magi_gateway_streams_total", "Streamed API responses started", [])
        self.gw_cancelled = _counter("magi_gateway_cancelled_total", "API requests whose client went away first", [])
        self.sources = _gauge("magi_metrics_source_up", "1 when a source answered this scrape (stats, scheduler)",
                              ["source"])
        self.scrape = _gauge("magi_metrics_scrape_seconds", "Time this scrape spent gathering from the bus", [])
        self.all: list[Metric] = [v for v in vars(self).values() if isinstance(v, Metric)]


METRIC_NAMES = tuple(f.name for f in _Families().all)


def build(snap: Snapshot) -> list[Metric]:
    f = _Families()
    _services(f, snap.stats)
    _nodes(f, snap.nodes, snap.heartbeat_s)
    for (route, method), rs in sorted(snap.http.items()):
        for code, n in sorted(rs.codes.items()):
            f.http_requests.add_metric([route, method, str(code)], n)
        f.http_errors.add_metric([route, method], rs.errors)
        buckets, total_s, _ = cumulative(rs.latency.encode())
        f.http_latency.add_metric([route, method], buckets, sum_value=total_s)
    g = snap.gateway
    f.gw_in_flight.add_metric([], g.get("in_flight", 0))
    f.gw_rejected.add_metric([], g.get("rejected", 0))
    f.gw_streams.add_metric([], g.get("streams", 0))
    f.gw_cancelled.add_metric([], g.get("cancelled", 0))
    for source, ok in sorted(snap.sources.items()):
        f.sources.add_metric([source], 1 if ok else 0)
    f.scrape.add_metric([], round(snap.scrape_s, 6))
    return f.all


def _num(value, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _services(f: _Families, replies: list[dict]) -> None:
    count: dict[str, int] = {}
    epochs: list[float] = []
    for reply in replies:
        name, sid = str(reply.get("name", "")), str(reply.get("id", ""))
        count[name] = count.get(name, 0) + 1
        endpoints = [e for e in reply.get("endpoints") or [] if isinstance(e, dict)]
        service_data: dict = {}
        for e in endpoints:
            labels = [name, sid, str(e.get("subject", ""))]
            data = e.get("data") if isinstance(e.get("data"), dict) else {}
            service_data = service_data or data
            f.ep_requests.add_metric(labels, _num(e.get("num_requests")))
            f.ep_errors.add_metric(labels, _num(e.get("num_errors")))
            if "in_flight" in data:
                f.ep_in_flight.add_metric(labels, _num(data["in_flight"]))
            if "latency" in data:
                try:
                    buckets, total_s, _ = cumulative(data["latency"])
                except ValueError as exc:
                    log.debug("unreadable latency histogram", extra={"service": name, "error": str(exc)})
                else:
                    f.ep_latency.add_metric(labels, buckets, sum_value=total_s)
        _service_figures(f, sid, service_data, epochs)
    for name, n in sorted(count.items()):
        f.instances.add_metric([name], n)
    if epochs:
        f.epoch.add_metric([], max(epochs))


def _service_figures(f: _Families, sid: str, data: dict, epochs: list[float]) -> None:
    """The service-wide figures a service adds to its endpoints' data (`MagiService.extra_stats`)."""
    models = data.get("models")
    if isinstance(models, dict):
        for model, m in sorted(models.items()):
            if isinstance(m, dict):
                f.queue.add_metric([sid, model], _num(m.get("queued")))
                f.ready.add_metric([sid, model], _num(m.get("ready")))
                if "refused" in m:
                    f.refused.add_metric([sid, model], _num(m["refused"]))
    for r in data.get("replicas") or []:
        if not isinstance(r, dict):
            continue
        labels = [sid, str(r.get("model", "")), str(r.get("replica", "")), str(r.get("node", ""))]
        f.in_flight.add_metric(labels, _num(r.get("in_flight")))
        f.served.add_metric(labels, _num(r.get("served")))
        f.tokens.add_metric(labels, _num(r.get("tokens")))
        f.rate.add_metric(labels, _num(r.get("tokens_per_s")))
        f.util.add_metric(labels, _num(r.get("utilisation")))
        state = str(r.get("state", ""))
        f.up.add_metric([*labels, state], 1 if state == "ready" else 0)
    if "cancelled" in data:
        f.cancelled.add_metric([sid], _num(data["cancelled"]))
    missions = data.get("missions")
    if isinstance(missions, dict):
        for outcome, n in sorted(missions.items()):
            f.missions.add_metric([sid, str(outcome)], _num(n))
        f.retries.add_metric([sid], _num(data.get("mission_retries")))
        f.running.add_metric([sid], _num(data.get("missions_running")))
    if "missions_refused" in data:
        f.missions_refused.add_metric([sid], _num(data["missions_refused"]))
    if "placement_epoch" in data:
        epochs.append(_num(data["placement_epoch"]))
        f.leader.add_metric([sid], 1 if data.get("leading") is True else 0)


def node_status(seen: NodeSeen, heartbeat_s: float) -> str:
    """The scheduler's status when it answered; else the heartbeat's own, or UNAVAILABLE once it is older
    than the scheduler's failover grace (the same rule, seen from the gateway)."""
    if seen.status:
        return seen.status
    hb = seen.heartbeat
    if hb is None or seen.age_s is None:
        return "UNAVAILABLE"
    grace = FAILOVER_MISSED_BEATS * (hb.interval_s or heartbeat_s)
    return hb.health if seen.age_s <= grace else "UNAVAILABLE"


def _nodes(f: _Families, nodes: dict[str, NodeSeen], heartbeat_s: float) -> None:
    for name, seen in sorted(nodes.items()):
        status = node_status(seen, heartbeat_s)
        f.node_up.add_metric([name], 0 if status == "UNAVAILABLE" else 1)
        for state in HEALTH_STATES:
            f.node_health.add_metric([name, state], 1 if state == status else 0)
        hb = seen.heartbeat
        if hb is None:
            continue
        if seen.age_s is not None:
            f.node_age.add_metric([name], round(seen.age_s, 3))
        f.ram.add_metric([name, "total"], hb.ram_total_gb * GIB)
        f.ram.add_metric([name, "used"], hb.ram_used_gb * GIB)
        f.cpu.add_metric([name], hb.cpu_percent)
        f.load.add_metric([name], hb.load_1m)
        f.disk.add_metric([name, "total"], hb.disk_total_gb * GIB)
        f.disk.add_metric([name, "used"], hb.disk_total_gb * hb.disk_percent / 100 * GIB)
        for i, g in enumerate(hb.gpus):
            f.gpu.add_metric([name, str(i), g.name, "total"], g.memory_total_gb * GIB)
            f.gpu.add_metric([name, str(i), g.name, "used"], g.memory_used_gb * GIB)
        states: dict[str, int] = {}
        for inst in hb.instances:
            states[inst.state] = states.get(inst.state, 0) + 1
        for state, n in sorted(states.items()):
            f.node_instances.add_metric([name, state], n)

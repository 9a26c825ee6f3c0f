"""`/metrics`: the whole cluster in Prometheus's text format, gathered from the bus at each scrape.

MAGI's services are separate processes that serve no HTTP; each reports its endpoints (requests, errors,
a latency histogram) and its own figures (queue depth, tokens, missions by outcome, placement epoch) in
NATS micro's `$SRV.STATS` (shared.service). A scrape here:
- asks `$SRV.STATS` of every service at once and gathers the answers for at most `STATS_WAIT_S` (it stops
  early once as many instances answered as last time and no more arrive for `QUIET_S`),
- asks the scheduler for its view of the nodes (`magi.sched.nodes`, same bound),
- adds the newest heartbeat of each node (a subscription kept here, so nodes show even with the
  scheduler down) and the gateway's own HTTP figures (`HttpMetrics`, an ASGI middleware),
then builds the families (metric_families.py) synchronously, with no bus call inside. A service down
costs its series, never the scrape: the scrape takes at most about `STATS_WAIT_S`. Scrapes that arrive
together share one gathering.

Auth: `/metrics` needs the API's bearer key, like `/v1` and the dashboard's data: it names nodes, hosts,
models and GPUs. Prometheus sends it with `authorization: {credentials_file: ...}` (README, Metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.aio.client import Client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from protos.common import Empty
from protos.node import NodesReply
from services.gateway import mapping
from services.gateway.heartbeats import Heartbeats
from services.gateway.keys import ApiKeys
from services.gateway.metric_families import NodeSeen, RouteStats, Snapshot, build
from shared import bus
from shared.config import Settings
from shared.errors import MagiError

log = logging.getLogger("magi.gateway.metrics")

STATS_WAIT_S = 1.0  # the longest a scrape waits for `$SRV.STATS` answers and the scheduler
QUIET_S = 0.05  # once as many instances answered as last time: stop when none more come this long
FORGET_NODE_S = 3600.0  # a node neither heard nor listed by the scheduler this long leaves the metrics
METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}

_reply = msgspec.json.Decoder(dict)


class HttpMetrics:
    """ASGI middleware: each HTTP response's route (the matched route's path, never the raw path, so a
    scanner's URLs cannot grow the label set), method, status and time to the end of its body."""

    def __init__(self, app, routes: dict[tuple[str, str], RouteStats]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server sends when the app raises before starting a response

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            key = (route, method if method in METHODS else "OTHER")
            stats = self.routes.get(key)
            if stats is None:
                stats = self.routes[key] = RouteStats()
            stats.observe(status, time.perf_counter() - started)


class Metrics(Collector):
    def __init__(self, settings: Settings, nc: Client, keys: ApiKeys, gateway_counters, heartbeats: Heartbeats) -> None:
        self.settings = settings
        self.nc = nc
        self.keys = keys
        self.gateway_counters = gateway_counters  # app.Counters
        self.http: dict[tuple[str, str], RouteStats] = {}
        self.heartbeats = heartbeats.latest  # node -> (newest heartbeat, received at), shared with the dashboard
        self.snapshot = Snapshot()
        self.registry = CollectorRegistry(auto_describe=False)  # its own: nothing of this process's globals
        self.registry.register(self)
        self._expected = 0  # instances that answered `$SRV.STATS` last time
        self._gathering: asyncio.Future | None = None

    def middleware(self, app) -> HttpMetrics:
        return HttpMetrics(app, self.http)

    # ---- the route ---------------------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        if not self.keys.check(request.headers.get("authorization")):
            status, body, headers = mapping.http_error(mapping.Unauthorized(
                "invalid or missing API key (Authorization: Bearer <key>; Prometheus: `authorization` with "
                "`credentials_file` in the scrape config)"))
            return Response(msgspec.json.encode(body), status, headers, media_type="application/json")
        await self.gather()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def collect(self):
        return build(self.snapshot)

    # ---- gathering ---------------------------------------------------------------------------------

    async def gather(self) -> None:
        """Refresh the snapshot; scrapes that arrive while one gathers wait for that one."""
        if self._gathering is None or self._gathering.done():
            self._gathering = asyncio.ensure_future(self._gather())
        await asyncio.shield(self._gathering)  # a scraper that leaves does not cancel the others' gathering

    async def _gather(self) -> None:
        started = time.perf_counter()
        stats, nodes = await asyncio.gather(self._stats(), self._scheduler_nodes())
        c = self.gateway_counters
        self.snapshot = Snapshot(
            stats=stats or [], nodes=self._nodes(nodes), http=self.http, heartbeat_s=self.settings.heartbeat_s,
            gateway={"in_flight": c.in_flight, "rejected": c.rejected, "streams": c.streams, "cancelled": c.cancelled},
            sources={"stats": stats is not None and bool(stats), "scheduler": nodes is not None},
            scrape_s=time.perf_counter() - started)

    async def _stats(self) -> list[dict] | None:
        """Every service instance's `$SRV.STATS` answer that arrives in time; None when the bus is away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STATS_WAIT_S
        replies: list[dict] = []
        try:
            sub = await self.nc.subscribe(self.nc.new_inbox())
        except Exception as exc:
            log.warning("cannot gather $SRV.STATS", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            return None
        try:
            await self.nc.publish("$SRV.STATS", b"", reply=sub.subject)
            while (left := deadline - loop.time()) > 0:
                wait = min(left, QUIET_S) if self._expected and len(replies) >= self._expected else left
                try:
                    msg = await sub.next_msg(timeout=wait)
                except Exception:  # nats' timeout: nobody else is answering
                    break
                with contextlib.suppress(msgspec.DecodeError):
                    reply = _reply.decode(msg.data)
                    if reply.get("type") == "io.nats.micro.v1.stats_response" or "endpoints" in reply:
                        replies.append(reply)
        except Exception as exc:
            log.warning("cannot gather $SRV.STATS", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            return None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._expected = len(replies)
        return replies

    async def _scheduler_nodes(self) -> NodesReply | None:
        try:
            return await bus.request(self.nc, "magi.sched.nodes", Empty(), NodesReply, timeout=STATS_WAIT_S)
        except MagiError:
            return None

    def _nodes(self, reply: NodesReply | None) -> dict[str, NodeSeen]:
        """Each node's newest heartbeat (ours, or the scheduler's when it heard one later) and status."""
        now = time.monotonic()
        seen = {name: NodeSeen(heartbeat=hb, age_s=now - received) for name, (hb, received) in self.heartbeats.items()
                if now - received <= FORGET_NODE_S}
        for state in reply.nodes if reply else []:
            mine = seen.get(state.name)
            theirs_fresher = state.last_seen_s is not None and (mine is None or mine.age_s is None
                                                                or state.last_seen_s < mine.age_s)
            if mine is None or theirs_fresher:
                hb = state.heartbeat if state.heartbeat.node else None
                mine = seen[state.name] = NodeSeen(heartbeat=hb, age_s=state.last_seen_s if hb else None)
            mine.status = state.status
        return seen

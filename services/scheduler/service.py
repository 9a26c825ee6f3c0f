"""`magi.sched.nodes` / `magi.sched.report`, fed by every agent's heartbeat."""

from __future__ import annotations

import logging

import msgspec

from protos.common import Empty
from protos.node import ClusterReport, Heartbeat, NodesReply
from services.scheduler.health import build_report
from services.scheduler.registry import NodeRegistry
from shared.config import Settings
from shared.service import MagiService, RequestContext

VERSION = "0.1.0"
log = logging.getLogger("magi.scheduler")
_heartbeat = msgspec.json.Decoder(Heartbeat)


class SchedulerEndpoints:
    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry

    async def on_heartbeat(self, msg) -> None:
        try:
            hb = _heartbeat.decode(msg.data)
        except msgspec.MsgspecError as exc:
            log.warning("dropped a bad heartbeat", extra={"subject": msg.subject, "error": str(exc)})
            return
        if msg.subject != f"magi.node.{hb.node}.heartbeat":
            log.warning("dropped a heartbeat naming another node", extra={"subject": msg.subject, "node": hb.node})
            return
        try:
            await self.registry.record(hb)
        except Exception:
            log.exception("could not record heartbeat", extra={"node": hb.node})

    async def nodes(self, req: Empty, ctx: RequestContext) -> NodesReply:
        return NodesReply(nodes=await self.registry.nodes())

    async def report(self, req: Empty, ctx: RequestContext) -> ClusterReport:
        return build_report(await self.registry.nodes())


async def build(settings: Settings):
    registry = await NodeRegistry.open(settings.redis_url, settings.heartbeat_s)
    service = MagiService("magi-scheduler", VERSION, "Node registry and placement", settings)
    endpoints = SchedulerEndpoints(registry)
    service.endpoint("magi.sched.nodes", Empty, endpoints.nodes)
    service.endpoint("magi.sched.report", Empty, endpoints.report)
    nc = await service.connect()
    await nc.subscribe("magi.node.*.heartbeat", cb=endpoints.on_heartbeat)
    return service, registry.close

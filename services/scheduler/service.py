"""`magi.sched.nodes` / `magi.sched.report`, fed by every agent's heartbeat."""

from __future__ import annotations

import logging
import re

import msgspec
from nats.aio.msg import Msg

from protos.common import Empty
from protos.node import ClusterReport, Heartbeat, NodesReply
from services.scheduler.state import NodeRegistry
from shared.config import Settings
from shared.service import MagiService, RequestContext

NAME = "magi-scheduler"
VERSION = "0.1.0"
HEARTBEATS = "magi.node.*.heartbeat"
log = logging.getLogger("magi.scheduler")

_heartbeat = msgspec.json.Decoder(Heartbeat)
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # the agent's rule: a name is one safe subject token


class SchedulerEndpoints:
    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry

    async def on_heartbeat(self, msg: Msg) -> None:
        """Record a heartbeat; anything malformed is logged and dropped, never raised into the subscription."""
        try:
            hb = _heartbeat.decode(msg.data)
        except msgspec.MsgspecError as exc:
            log.warning("dropped a bad heartbeat", extra={"subject": msg.subject, "error": str(exc)[:200]})
            return
        # A node may only speak for itself: the name inside must be the subject's token.
        if msg.subject != f"magi.node.{hb.node}.heartbeat" or not _NODE_NAME.match(hb.node):
            log.warning("dropped a heartbeat naming another node", extra={"subject": msg.subject, "node": hb.node[:80]})
            return
        try:
            await self.registry.record(hb)
        except Exception as exc:  # Redis trouble: liveness is already recorded in memory
            log.warning("could not store heartbeat", extra={"node": hb.node, "error": f"{type(exc).__name__}: {exc}"})

    async def nodes(self, req: Empty, ctx: RequestContext) -> NodesReply:
        return NodesReply(nodes=await self.registry.nodes())

    async def report(self, req: Empty, ctx: RequestContext) -> ClusterReport:
        return await self.registry.report()


async def build(settings: Settings):
    registry = await NodeRegistry.open(settings.redis_url, settings.heartbeat_s)
    try:
        service = MagiService(NAME, VERSION, "Node registry and cluster report", settings)
        endpoints = SchedulerEndpoints(registry)
        service.endpoint("magi.sched.nodes", Empty, endpoints.nodes)
        service.endpoint("magi.sched.report", Empty, endpoints.report)
        nc = await service.connect()
        await nc.subscribe(HEARTBEATS, cb=endpoints.on_heartbeat)
    except BaseException:
        await registry.close()
        raise
    return service, registry.close

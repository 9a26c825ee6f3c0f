"""`magi.sched.*`: nodes, report, place, release, drain, rebalance, assignments.<node>; failover in the background.

Several schedulers may run against one Redis; one leads (services.scheduler.lease). Every scheduler
hears heartbeats and answers the read-only `nodes` and `report`. Only the leader serves `place`,
`release`, `drain`, `rebalance` and `assignments.<node>`: it registers them as a second micro service instance on a
connection of its own, opened on taking office and drained on leaving it, so NATS never routes a write
or an agent's question to a standby. In the moment between losing the lease and closing that connection
(a leader paused with SIGSTOP wakes up deposed), it answers 503 "not the leader; retry".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re

import msgspec
import redis.asyncio as redis
from nats.aio.msg import Msg

from protos.common import Empty
from protos.node import ClusterReport, Heartbeat, NodesReply
from protos.sched import (
    AssignmentsReply,
    AssignmentsRequest,
    DrainReply,
    DrainRequest,
    PlaceReply,
    PlaceRequest,
    RebalanceReply,
    RebalanceRequest,
    ReleaseReply,
    ReleaseRequest,
)
from services.scheduler.cluster import load_cluster
from services.scheduler.core import SchedulerCore, report
from services.scheduler.leadership import Leadership
from services.scheduler.lease import Lease, NotLeader
from services.scheduler.placements import PlacementStore
from services.scheduler.state import NodeRegistry
from shared.config import Settings
from shared.errors import BadRequest
from shared.service import MagiService, RequestContext

NAME = "magi-scheduler"
VERSION = "0.2.0"
HEARTBEATS = "magi.node.*.heartbeat"
log = logging.getLogger("magi.scheduler")

_heartbeat = msgspec.json.Decoder(Heartbeat)
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # the agent's rule: a name is one safe subject token


def reconcile_subject(node: str) -> str:
    return f"magi.node.{node}.reconcile"


class SchedulerEndpoints:
    def __init__(self, core: SchedulerCore, service: MagiService) -> None:
        self.core = core
        self.service = service

    async def nudge(self, nodes: set[str]) -> None:
        """Tell agents their assignments changed, so they reconcile now instead of at the next beat."""
        for node in sorted(n for n in nodes if n):
            await self.service.nc.publish(reconcile_subject(node), str(self.core.epoch).encode())

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
            await self.core.registry.record(hb)
            if self.core.lease.held():
                await self.core.repair_epoch(hb)
                await self.core.note_instance_states(hb)
        except Exception as exc:  # Redis trouble: liveness is already recorded in memory
            log.warning("could not store heartbeat", extra={"node": hb.node, "error": f"{type(exc).__name__}: {exc}"})

    async def nodes(self, req: Empty, ctx: RequestContext) -> NodesReply:
        return NodesReply(nodes=await self.core.registry.nodes())

    async def report(self, req: Empty, ctx: RequestContext) -> ClusterReport:
        if not self.core.lease.held():
            await self.core.refresh()  # a standby reports what the leader last stored
        return await report(self.core)

    async def place(self, req: PlaceRequest, ctx: RequestContext) -> PlaceReply:
        result, epoch, touched = await self.core.place(req.instances, req.placement)
        await self.nudge(touched)
        return PlaceReply(placements=result.placements, unplaced=result.unplaced, epoch=epoch, optimal=result.optimal,
                          score_optimal=result.score_optimal, method=result.method, solve_ms=round(result.solve_ms, 1))

    async def rebalance(self, req: RebalanceRequest, ctx: RequestContext) -> RebalanceReply:
        return await self.core.rebalance(req.dry_run, req.budget_s, self.nudge)

    async def release(self, req: ReleaseRequest, ctx: RequestContext) -> ReleaseReply:
        released, unknown, epoch, touched = await self.core.release(req.instance_ids)
        await self.nudge(touched)
        return ReleaseReply(released=released, unknown=unknown, epoch=epoch)

    async def drain(self, req: DrainRequest, ctx: RequestContext) -> DrainReply:
        result, epoch, touched = await self.core.drain(req.node, req.drain)
        await self.nudge(touched | {req.node})
        # The node's status as placement now sees it (after an undrain: whatever its heartbeats say).
        _, _, states = await self.core.view()
        status = next((st.status for st in states if st.name == req.node), "UNAVAILABLE")
        return DrainReply(node=req.node, status=status, moved=result.placements, unplaced=result.unplaced, epoch=epoch)

    async def assignments(self, req: AssignmentsRequest, ctx: RequestContext) -> AssignmentsReply:
        # nats-server lets only node X's agent publish `magi.sched.assignments.X`; the body must agree.
        token = ctx.subject.rpartition(".")[2]
        if req.node != token:
            raise BadRequest(f"node {req.node!r} does not match the subject's node {token!r}", field="node")
        return self.core.assignments(req.node)

    async def failover_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval / 4)
            try:
                dead = await self.core.dead_nodes(interval)
                _, _, touched = await self.core.evacuate(dead)
                await self.nudge(touched)
            except NotLeader:
                continue  # the lease lapsed a moment before the duties stop: nothing was written
            except Exception:  # one bad round must not end failover
                log.exception("failover round failed")


class LeaderDuties:
    """What only the leader does: answer writes and assignments, and fail over."""

    WRITES = (("place", PlaceRequest, "place"), ("release", ReleaseRequest, "release"),
              ("drain", DrainRequest, "drain"), ("rebalance", RebalanceRequest, "rebalance"),
              ("assignments.*", AssignmentsRequest, "assignments"))

    def __init__(self, endpoints: SchedulerEndpoints, settings: Settings) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self.service: MagiService | None = None
        self.failover: asyncio.Task | None = None

    async def start(self) -> None:
        await self.endpoints.core.take_over()
        service = MagiService(NAME, VERSION, "The leader's writes: place, release, drain, assignments", self.settings)
        for verb, typ, handler in self.WRITES:
            service.endpoint(f"magi.sched.{verb}", typ, getattr(self.endpoints, handler))
        self.service = service
        await service.connect()
        await service.start()
        self.failover = asyncio.create_task(self.endpoints.failover_loop(self.settings.heartbeat_s))

    async def stop(self) -> None:
        if self.failover is not None:
            self.failover.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.failover
            self.failover = None
        if self.service is not None and self.service.nc is not None:
            # Closed, not drained: the server drops every leader subscription at once, so no request meets
            # a deposed leader again; the few in flight get no answer and are retried by their callers.
            service, self.service = self.service, None
            try:
                await service.nc.close()
            except Exception as exc:  # a connection already broken needs no closing
                log.debug("leader connection closed badly", extra={"error": f"{type(exc).__name__}: {exc}"})


def placement_budget(cluster, settings: Settings) -> float:
    """The cluster file's placement.budget_s when it sets one, else MAGI_SCHED_PLACE_BUDGET_S."""
    if cluster is not None and cluster.placement.budget_s is not None:
        return cluster.placement.budget_s
    return settings.sched_place_budget_s


async def build(settings: Settings):
    client = redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    registry = await NodeRegistry.open(settings.redis_url, settings.heartbeat_s)
    cluster = load_cluster(settings.cluster_file) if settings.cluster_file else None
    lease = Lease(client, f"{settings.node()}-{os.getpid()}", settings.sched_lease_s)
    core = SchedulerCore(registry, PlacementStore(client), lease, cluster.nodes if cluster else None,
                         cluster.placement.weights if cluster else None,
                         placement_budget(cluster, settings))
    await core.load()
    service = MagiService(NAME, VERSION, "Node registry, placement and failover", settings)
    endpoints = SchedulerEndpoints(core, service)
    service.endpoint("magi.sched.nodes", Empty, endpoints.nodes)
    service.endpoint("magi.sched.report", Empty, endpoints.report)
    # In `$SRV.STATS` (the gateway's `/metrics`): a standby's epoch may lag the leader's, readers take the highest.
    service.extra_stats = lambda: {"placement_epoch": core.epoch, "leading": core.lease.held()}
    nc = await service.connect()
    await nc.subscribe(HEARTBEATS, cb=endpoints.on_heartbeat)
    duties = LeaderDuties(endpoints, settings)
    leadership = Leadership(lease, duties.start, duties.stop, renew_s=settings.sched_lease_s / 3)
    await leadership.step()  # a lone scheduler leads before anyone asks it anything
    if not leadership.leading:
        log.info("standing by", extra={"leader": await lease.leader()})
    election = asyncio.create_task(leadership.run(), name="scheduler-leadership")

    async def cleanup() -> None:
        election.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await election
        await leadership.resign()
        await registry.close()
        await client.aclose()

    return service, cleanup

"""Heartbeats on `magi.node.<node>.heartbeat`; the latest sample on `magi.node.<node>.info`; the tail of
its instances' logs on `magi.node.<node>.logs` (their live lines: `magi.node.<node>.logs.<instance>`); models
of the bus's model store fetched into the node's cache on `magi.node.<node>.models.fetch` (models.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import msgspec

from protos.common import Empty
from protos.node import Heartbeat, InstanceLog, LogsReply, LogsRequest, ModelFetchReply, ModelFetchRequest
from protos.sched import AssignmentsReply, AssignmentsRequest
from services.agent.models import NodeModels
from services.agent.policy import load_policy
from services.agent.rayjoin import own_specs
from services.agent.resources import prime_cpu_percent, sample
from services.agent.supervisor import Supervisor, read_tail
from shared import bus, sdnotify
from shared.config import Settings
from shared.errors import BadRequest, MagiError, NotFound
from shared.roles import agent_identity
from shared.service import MagiService, RequestContext

NAME = "magi-agent"
VERSION = "0.1.0"
log = logging.getLogger("magi.agent")

# The node name becomes one token of NATS subjects: no dots, spaces or wildcards.
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_encoder = msgspec.json.Encoder()
# A logs reply stays well under NATS's default 1 MiB payload, however many instances it covers.
LOGS_REPLY_BYTES = 512 * 1024


def node_name(settings: Settings) -> str:
    name = settings.node()
    if not _NODE_NAME.match(name):
        raise BadRequest(
            f"node name {name!r} is not usable in NATS subjects: use 1-64 letters, digits, '-' or '_' "
            "(set MAGI_NODE_NAME)",
            field="node_name",
        )
    return name


# Every placement change bumps the epoch by one; no real scheduler jumps a million changes at once. Only
# the scheduler's identity may answer assignments (nats-server enforces it); this guards the rest.
MAX_EPOCH_JUMP = 1_000_000


def plausible_epoch(current: int, offered: int) -> bool:
    return offered < 2**53 and (current == 0 or offered - current <= MAX_EPOCH_JUMP)


def heartbeat_subject(node: str) -> str:
    return f"magi.node.{node}.heartbeat"


class Agent:
    """Heartbeats on one task, reconciling on another: stopping a stubborn instance never delays a beat.

    The agent holds its scheduler-assigned instances on a lease: each assignments reply renews it. Cut
    off from the scheduler (no current reply, or no bus) for longer than the lease, it stops them (fences
    itself), since the scheduler has by then re-placed them elsewhere; its own instances (joining Ray)
    keep running. When a reply comes again it runs what that reply assigns.
    """

    def __init__(self, service: MagiService, node: str, settings: Settings) -> None:
        self.service = service
        self.node = node
        self.settings = settings
        self.latest: Heartbeat | None = None
        self.seq = 0
        self.home = settings.home_path  # resolved once, here, rather than on the loop at every beat
        self._tasks: list[asyncio.Task] = []
        self.epoch = 0  # newest placement epoch seen: older assignment lists are stale and ignored
        # Instances of this node's own, not the scheduler's (joining the Ray cluster): always kept.
        self.local = own_specs(settings, node)
        self.supervisor = Supervisor(node, self.home, self._publish, load_policy(settings.agent_policy), self.local)
        self._reconciling = asyncio.Lock()
        self._wake = asyncio.Event()  # a reconcile nudge: reconcile now rather than at the next interval
        self.lease_s = settings.agent_lease()
        self.contact = time.monotonic()  # the last current assignments reply (starting counts: nothing runs yet)
        self.fenced = False
        self.refusing = ""  # why the last reply was not acted on, logged once until one is
        self.models = NodeModels(node, settings)

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        await self.service.nc.publish(subject, data, headers=headers)

    async def _sample(self) -> Heartbeat:
        hb = await asyncio.to_thread(sample, self.node, self.seq, [], home=self.home)
        hb.instances = self.supervisor.statuses()
        hb.interval_s = self.settings.heartbeat_s
        hb.epoch = self.epoch  # so a new scheduler leader never offers less than we have seen
        hb.models, hb.model_room_gb = await asyncio.to_thread(self.models.holdings, self.models.keep())
        return hb

    async def reconcile(self) -> None:
        """Run exactly what the scheduler assigns here now: this is also the fence after a partition."""
        async with self._reconciling:
            reply = await self._assignments()
            if reply is None or not self._current(reply):
                await self._fence_if_lease_ran_out()
                return
            self._heard()
            self.epoch = reply.epoch
            await self.supervisor.reconcile([*reply.instances, *self.local], reply.epoch)

    async def _assignments(self) -> AssignmentsReply | None:
        # A timeout earns one more try: a deposed leader that is paused (not dead) still holds its
        # subscriptions, and NATS hands it a share of the requests until it wakes up and lets go.
        for attempt in range(2):
            try:
                return await bus.request(self.service.nc, f"magi.sched.assignments.{self.node}",
                                         AssignmentsRequest(node=self.node), AssignmentsReply,
                                         timeout=max(self.settings.heartbeat_s, 0.5))
            except MagiError as exc:  # no scheduler (or no leader yet): keep running what we have, for the lease
                log.debug("no assignments", extra={"node": self.node, "error": exc.message})
                if exc.code != 504:
                    return None
        return None

    def _current(self, reply: AssignmentsReply) -> bool:
        """Whether to act on `reply`; the first refusal of a kind is logged, not every one."""
        if reply.epoch < self.epoch:
            why = "older than ours (the scheduler raises its epoch from our heartbeats)"
        elif not plausible_epoch(self.epoch, reply.epoch):
            why = "implausible epoch"
        else:
            return True
        if self.refusing != why:
            log.warning("ignored assignments", extra={"node": self.node, "why": why, "epoch": self.epoch,
                                                      "offered": reply.epoch})
            self.refusing = why
        return False

    def _heard(self) -> None:
        if self.refusing:
            log.info("assignments current again", extra={"node": self.node, "epoch": self.epoch})
            self.refusing = ""
        if self.fenced:
            log.info("scheduler reachable again: running what it assigns",
                     extra={"node": self.node, "silent_s": round(time.monotonic() - self.contact, 3)})
            self.fenced = False
        self.contact = time.monotonic()

    async def _fence_if_lease_ran_out(self) -> None:
        silent = time.monotonic() - self.contact
        if self.fenced or silent <= self.lease_s:
            return
        self.fenced = True
        own = {s.instance_id for s in self.local}
        stopping = sorted(i for i in self.supervisor.instances if i not in own)
        log.warning("scheduler unreachable past the agent's lease: stopping assigned instances",
                    extra={"node": self.node, "silent_s": round(silent, 3), "lease_s": self.lease_s,
                           "instances": stopping})
        await self.supervisor.reconcile(self.local, self.epoch)

    async def on_nudge(self, msg) -> None:
        self._wake.set()

    async def beat(self) -> Heartbeat:
        self.seq += 1
        hb = await self._sample()
        self.latest = hb
        assert self.service.nc is not None
        await self.service.nc.publish(heartbeat_subject(self.node), _encoder.encode(hb))
        return hb

    async def heartbeats(self) -> None:
        await asyncio.to_thread(prime_cpu_percent)
        interval = self.settings.heartbeat_s
        next_at = time.monotonic()
        while True:
            try:
                await self.beat()
            except Exception as exc:  # a failed sample or publish must not end the heartbeats
                log.warning("heartbeat failed", extra={"node": self.node, "error": f"{type(exc).__name__}: {exc}"})
            sdnotify.notify("WATCHDOG=1")  # the loop is alive; a hung loop stops these and systemd restarts us
            # A fixed cadence: slow sampling does not stretch the interval the scheduler expects.
            next_at = max(next_at + interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    async def reconciling(self) -> None:
        """Ask for assignments every interval, or at once when nudged; nudges during a round coalesce."""
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception as exc:  # one bad round must not end reconciling
                log.warning("reconcile failed", extra={"node": self.node, "error": f"{type(exc).__name__}: {exc}"})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.heartbeat_s)

    async def info(self, req: Empty, ctx: RequestContext) -> Heartbeat:
        # Before the first beat, a fresh sample (not published: the heartbeat stream stays the loop's).
        return self.latest or await self._sample()

    async def logs(self, req: LogsRequest, ctx: RequestContext) -> LogsReply:
        """The last lines of one instance's log, or of every instance that has one on this node."""
        folder = self.supervisor.logs
        if req.instance:
            if "/" in req.instance or req.instance.startswith("."):
                raise BadRequest(f"{req.instance!r} is not an instance id", field="instance")
            if not (folder / f"{req.instance}.log").exists():
                raise NotFound(f"no log of instance {req.instance} on node {self.node}")
            ids = [req.instance]
        else:
            ids = sorted(p.stem for p in folder.glob("*.log"))
        budget = max(16 * 1024, LOGS_REPLY_BYTES // max(1, len(ids)))
        tails = await asyncio.to_thread(lambda: [read_tail(folder / f"{i}.log", req.lines, budget) for i in ids])
        return LogsReply(node=self.node, logs=[InstanceLog(instance_id=i, lines=lines, offset=offset)
                                               for i, (lines, offset) in zip(ids, tails)])

    async def fetch_model(self, req: ModelFetchRequest, ctx: RequestContext) -> ModelFetchReply:
        """A model of the store in this node's cache, verified: the path a replica placed here loads."""
        return await self.models.fetch(self.service.nc.jetstream(), req)

    async def start(self) -> None:
        if self.local:  # before any scheduler answers, so a node joins Ray even with none up yet
            await self.supervisor.reconcile(self.local, self.epoch)
        await self.service.nc.subscribe(f"magi.node.{self.node}.reconcile", cb=self.on_nudge)
        self._tasks = [asyncio.create_task(self.heartbeats(), name=f"heartbeat-{self.node}"),
                       asyncio.create_task(self.reconciling(), name=f"reconcile-{self.node}")]
        sdnotify.notify("READY=1")

    async def close(self) -> None:
        sdnotify.notify("STOPPING=1")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.supervisor.stop_all()


async def build(settings: Settings):
    node = node_name(settings)
    service = MagiService(NAME, VERSION, f"Node agent of {node}", settings, identity=agent_identity(node))
    agent = Agent(service, node, settings)
    service.endpoint(f"magi.node.{node}.info", Empty, agent.info)
    service.endpoint(f"magi.node.{node}.logs", LogsRequest, agent.logs)
    service.endpoint(f"magi.node.{node}.models.fetch", ModelFetchRequest, agent.fetch_model)
    await service.connect()
    await agent.start()  # heartbeats start at once; the runner registers the endpoint right after build
    if settings.agent_lease_s and settings.agent_lease_s < agent.lease_s:
        log.warning("MAGI_AGENT_LEASE_S raised to the scheduler's failover grace",
                    extra={"node": node, "asked_s": settings.agent_lease_s, "lease_s": agent.lease_s})
    log.info("agent started", extra={"node": node, "interval_s": settings.heartbeat_s, "lease_s": agent.lease_s,
                                     "policy": agent.supervisor.policy.source or "none: assigned commands are refused"})
    return service, agent.close

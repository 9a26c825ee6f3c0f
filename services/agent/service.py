"""Heartbeats on `magi.node.<node>.heartbeat`; the latest sample on `magi.node.<node>.info`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import msgspec

from protos.common import Empty
from protos.node import Heartbeat
from protos.sched import AssignmentsReply, AssignmentsRequest
from services.agent.policy import load_policy
from services.agent.rayjoin import own_specs
from services.agent.resources import prime_cpu_percent, sample
from services.agent.supervisor import Supervisor
from shared import bus, sdnotify
from shared.config import Settings
from shared.errors import BadRequest, MagiError
from shared.roles import agent_identity
from shared.service import MagiService, RequestContext

NAME = "magi-agent"
VERSION = "0.1.0"
log = logging.getLogger("magi.agent")

# The node name becomes one token of NATS subjects: no dots, spaces or wildcards.
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_encoder = msgspec.json.Encoder()


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
    def __init__(self, service: MagiService, node: str, settings: Settings) -> None:
        self.service = service
        self.node = node
        self.settings = settings
        self.latest: Heartbeat | None = None
        self.seq = 0
        self.home = settings.home_path  # resolved once, here, rather than on the loop at every beat
        self._task: asyncio.Task | None = None
        self.epoch = 0  # newest placement epoch seen: older assignment lists are stale and ignored
        # Instances of this node's own, not the scheduler's (joining the Ray cluster): always kept.
        self.local = own_specs(settings, node)
        self.supervisor = Supervisor(node, self.home, self._publish, load_policy(settings.agent_policy), self.local)
        self._reconciling = asyncio.Lock()

    async def _publish(self, subject: str, data: bytes) -> None:
        await self.service.nc.publish(subject, data)

    async def _sample(self) -> Heartbeat:
        hb = await asyncio.to_thread(sample, self.node, self.seq, [], home=self.home)
        hb.instances = self.supervisor.statuses()
        hb.interval_s = self.settings.heartbeat_s
        return hb

    async def reconcile(self) -> None:
        """Run exactly what the scheduler assigns here now: this is also the fence after a partition."""
        async with self._reconciling:
            try:
                reply = await bus.request(self.service.nc, f"magi.sched.assignments.{self.node}",
                                          AssignmentsRequest(node=self.node),
                                          AssignmentsReply, timeout=max(self.settings.heartbeat_s, 0.5))
            except MagiError as exc:  # no scheduler: keep running what we have
                log.debug("no assignments", extra={"node": self.node, "error": exc.message})
                return
            if reply.epoch < self.epoch:
                return
            if not plausible_epoch(self.epoch, reply.epoch):
                log.warning("ignored assignments with an implausible epoch",
                            extra={"node": self.node, "epoch": self.epoch, "offered": reply.epoch})
                return
            self.epoch = reply.epoch
            await self.supervisor.reconcile([*reply.instances, *self.local], reply.epoch)

    async def on_nudge(self, msg) -> None:
        await self.reconcile()

    async def beat(self) -> Heartbeat:
        self.seq += 1
        hb = await self._sample()
        self.latest = hb
        assert self.service.nc is not None
        await self.service.nc.publish(heartbeat_subject(self.node), _encoder.encode(hb))
        return hb

    async def run(self) -> None:
        await asyncio.to_thread(prime_cpu_percent)
        interval = self.settings.heartbeat_s
        next_at = time.monotonic()
        while True:
            try:
                await self.beat()
                await self.reconcile()
            except Exception as exc:  # a failed sample or publish must not end the heartbeats
                log.warning("heartbeat failed", extra={"node": self.node, "error": f"{type(exc).__name__}: {exc}"})
            sdnotify.notify("WATCHDOG=1")  # the loop is alive; a hung loop stops these and systemd restarts us
            # A fixed cadence: slow sampling does not stretch the interval the scheduler expects.
            next_at = max(next_at + interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    async def info(self, req: Empty, ctx: RequestContext) -> Heartbeat:
        # Before the first beat, a fresh sample (not published: the heartbeat stream stays the loop's).
        return self.latest or await self._sample()

    async def start(self) -> None:
        if self.local:  # before any scheduler answers, so a node joins Ray even with none up yet
            await self.supervisor.reconcile(self.local, self.epoch)
        await self.service.nc.subscribe(f"magi.node.{self.node}.reconcile", cb=self.on_nudge)
        self._task = asyncio.create_task(self.run(), name=f"heartbeat-{self.node}")
        sdnotify.notify("READY=1")

    async def close(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.supervisor.stop_all()


async def build(settings: Settings):
    node = node_name(settings)
    service = MagiService(NAME, VERSION, f"Node agent of {node}", settings, identity=agent_identity(node))
    agent = Agent(service, node, settings)
    service.endpoint(f"magi.node.{node}.info", Empty, agent.info)
    await service.connect()
    await agent.start()  # heartbeats start at once; the runner registers the endpoint right after build
    log.info("agent started", extra={"node": node, "interval_s": settings.heartbeat_s,
                                     "policy": agent.supervisor.policy.source or "none: assigned commands are refused"})
    return service, agent.close

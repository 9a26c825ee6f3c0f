"""Which of a mission's dependencies restarted, or whether the bus dropped, while an attempt ran.

A mission that runs out of time because it was slow has failed for good (504). One that ran out of
time because a reply was lost (the inference, memory or consensus process that held its request was
killed, or the NATS connection dropped and took replies with it) deserves another attempt. NATS cannot
tell a requester that its responder died, so this watch asks `$SRV.PING` every second and remembers
when the set of instances answering for each dependency last changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from nats.aio.client import Client

DEPENDENCIES = ("magi-inference", "magi-memory", "magi-consensus")
POLL_S = 1.0
ANSWER_WAIT_S = 0.4


class _Ping(msgspec.Struct):
    name: str = ""
    id: str = ""


_ping = msgspec.json.Decoder(_Ping)


class Disruptions:
    def __init__(self, dependencies: tuple[str, ...] = DEPENDENCIES) -> None:
        self.nc: Client | None = None  # set by start(): the callbacks exist before the connection
        self.dependencies = dependencies
        self.instances: dict[str, set[str]] = {}
        self.changed_at: dict[str, float] = {}
        self.bus_dropped_at = 0.0
        self._round: dict[str, set[str]] = {}
        self._task: asyncio.Task | None = None
        self.listeners: list = []  # called with (dependency name) when one of its instances is gone

    async def bus_dropped(self) -> None:
        """The connection's disconnect callback: replies in flight may be gone."""
        self.bus_dropped_at = time.monotonic()

    def since(self, started: float) -> str | None:
        """Why an attempt started at `started` (time.monotonic) may have lost a reply, or None."""
        if self.bus_dropped_at >= started:
            return "the bus connection dropped"
        restarted = [name for name, at in self.changed_at.items() if at >= started]
        return f"{', '.join(sorted(restarted))} restarted" if restarted else None

    async def start(self, nc: Client) -> None:
        self.nc = nc
        inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(inbox, cb=self._answer)
        self._task = asyncio.create_task(self._poll(inbox), name="dependency-watch")

    async def _answer(self, msg) -> None:
        with contextlib.suppress(msgspec.MsgspecError):
            ping = _ping.decode(msg.data)
            self._round.setdefault(ping.name, set()).add(ping.id)

    async def _poll(self, inbox: str) -> None:
        while True:
            self._round = {}
            with contextlib.suppress(Exception):  # the bus away: the disconnect callback notes it
                await self.nc.publish("$SRV.PING", b"", reply=inbox)
            await asyncio.sleep(ANSWER_WAIT_S)
            now = time.monotonic()
            for name in self.dependencies:
                seen = self._round.get(name, set())
                if name in self.instances and seen != self.instances[name]:
                    self.changed_at[name] = now
                    if self.instances[name] - seen:  # an instance vanished with whatever it was answering
                        for listener in self.listeners:
                            listener(name)
                self.instances[name] = seen
            await asyncio.sleep(POLL_S - ANSWER_WAIT_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

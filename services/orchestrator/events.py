"""Mission lifecycle events on `magi.mission.events.<id>` (see protos.mission): for watchers only.

Fire-and-forget by design: a core NATS publish only appends to the client's outgoing buffer, and any
error (the bus away and the buffer full, a permission refused) is logged once per outage and dropped,
so an event can never slow a mission down or fail it.
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.aio.client import Client

from protos.mission import (
    ANSWER_CHARS,
    EVENTS_PREFIX,
    EXCERPT_CHARS,
    CloneResult,
    MissionClone,
    MissionDecided,
    MissionEvent,
    MissionFailed,
    MissionReply,
    MissionStarted,
    PlannedClone,
)
from services.orchestrator.plan import CloneTask
from shared import bus
from shared.errors import MagiError

log = logging.getLogger("magi.orchestrator.events")
_encoder = msgspec.json.Encoder()


def subject(mission_id: str) -> str:
    return f"{EVENTS_PREFIX}.{mission_id}"


class MissionEvents:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.outage = bus.Outage("mission events", log)

    async def _publish(self, event: MissionEvent) -> None:
        event.at = time.time()
        try:
            await self.nc.publish(subject(event.mission_id), _encoder.encode(event))
        except Exception as exc:  # never the mission's problem
            self.outage.failed(exc)
        else:
            self.outage.ended()

    async def started(self, mission_id: str, prompt: str, strategy: str, tasks: list[CloneTask]) -> None:
        await self._publish(MissionStarted(
            mission_id=mission_id, prompt=prompt[:ANSWER_CHARS], strategy=strategy,
            clones=[PlannedClone(clone_id=t.clone_id, role=t.role, variation=t.variation) for t in tasks]))

    async def clone(self, mission_id: str, c: CloneResult) -> None:
        await self._publish(MissionClone(
            mission_id=mission_id, clone_id=c.clone_id, role=c.role, variation=c.variation, model=c.model,
            node=c.node, replica=c.replica, latency_ms=c.latency_ms, ok=c.ok, text=c.text[:EXCERPT_CHARS],
            error=c.error or "", completion_tokens=c.completion_tokens))

    async def decided(self, reply: MissionReply) -> None:
        s = reply.consensus
        await self._publish(MissionDecided(
            mission_id=reply.mission_id, consensus_id=s.id, strategy=s.strategy, answer=s.answer[:ANSWER_CHARS],
            agreement=s.agreement, votes=s.votes, winner=s.winner, cited=list(s.cited),
            total_ms=reply.timings.total_ms))

    async def failed(self, mission_id: str, error: MagiError) -> None:
        await self._publish(MissionFailed(mission_id=mission_id, code=error.code, error=error.message[:EXCERPT_CHARS]))

"""Mission lifecycle events (`magi.mission.events.<id>`): what the orchestrator tells watchers such as the
dashboard, read here as the gateway reads them, against the session stack with the real model."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import pytest

from protos.mission import (
    EVENTS_PREFIX,
    MissionClone,
    MissionDecided,
    MissionEvent,
    MissionFailed,
    MissionReply,
    MissionRequest,
    MissionStarted,
)
from shared import bus, errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

_event = msgspec.json.Decoder(MissionEvent)


async def _watch(nc, mission_id: str) -> tuple[list, object]:
    events: list = []

    async def append(msg) -> None:
        events.append(_event.decode(msg.data))

    sub = await nc.subscribe(f"{EVENTS_PREFIX}.{mission_id}", cb=append)
    return events, sub


async def _until(events: list, kind: type, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if any(isinstance(e, kind) for e in events):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind.__name__} event in {events}")


async def test_a_mission_publishes_started_each_clone_then_the_consensus(nc):
    mission_id = f"events-{uuid.uuid4().hex[:12]}"
    events, sub = await _watch(nc, mission_id)
    mission = MissionRequest(prompt="Name a primary colour.", variations=["in one word", "in one line"],
                             max_tokens=12, consensus="medoid", mission_id=mission_id)
    reply = await bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=150)
    await _until(events, MissionDecided)
    await sub.unsubscribe()

    kinds = [type(e) for e in events]
    assert kinds[0] is MissionStarted and kinds[-1] is MissionDecided, kinds
    assert kinds.count(MissionClone) == len(reply.clones) and MissionFailed not in kinds
    started, decided = events[0], events[-1]
    assert started.prompt == mission.prompt and started.strategy == "medoid"
    assert [c.clone_id for c in started.clones] == [c.clone_id for c in reply.clones] == ["var0", "var1"]
    clones = {e.clone_id: e for e in events if isinstance(e, MissionClone)}
    for c in reply.clones:  # each event says what the reply says about that clone
        e = clones[c.clone_id]
        assert (e.ok, e.model, e.node, e.role, e.text) == (c.ok, c.model, c.node, c.role, c.text[:600])
        assert e.latency_ms == c.latency_ms > 0
    assert decided.answer == reply.consensus.answer and decided.consensus_id == reply.consensus.id
    assert decided.agreement == reply.consensus.agreement and decided.votes == 2
    assert all(e.mission_id == mission_id for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events) and events[0].at > 0


async def test_a_mission_past_its_deadline_publishes_failed(nc):
    mission_id = f"events-late-{uuid.uuid4().hex[:12]}"
    events, sub = await _watch(nc, mission_id)
    mission = MissionRequest(prompt="Write a long essay about rivers.", max_tokens=400, deadline_s=0.05,
                             mission_id=mission_id)
    with pytest.raises(errors.DeadlineExceeded):
        await bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=60)
    await _until(events, MissionFailed)
    await sub.unsubscribe()
    failed = [e for e in events if isinstance(e, MissionFailed)]
    assert len(failed) == 1 and failed[0].code == 504 and "deadline" in failed[0].error
    assert not any(isinstance(e, MissionDecided) for e in events)

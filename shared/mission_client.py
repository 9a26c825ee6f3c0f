"""Running a mission from a client while showing each clone as it finishes."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client

from protos.mission import CloneResult, MissionReply, MissionRequest
from shared import bus


def clone_count(request: MissionRequest) -> int:
    return int(request.needs_deep_analysis or not request.variations) + len(request.variations)


async def run_mission(nc: Client, request: MissionRequest, progress, *, timeout: float) -> MissionReply:
    """`magi.mission.run`, with the orchestrator publishing each finished clone to an inbox of ours."""
    total, done = clone_count(request), 0

    async def on_clone(msg) -> None:
        nonlocal done
        done += 1
        clone = msgspec.json.decode(msg.data, type=CloneResult)
        outcome = "ok" if clone.ok else f"failed: {clone.error}"
        progress(f"clone {clone.clone_id} ({clone.role}) {outcome} in {clone.latency_ms:.0f} ms [{done}/{total}]")

    sub = await nc.subscribe(nc.new_inbox(), cb=on_clone)
    try:
        request.progress_subject = sub.subject
        return await bus.request(nc, "magi.mission.run", request, MissionReply, timeout=timeout)
    finally:
        await sub.unsubscribe()

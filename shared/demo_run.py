"""`magi demo`: bring the stack up if needed, seed memory, run the seed-000 mission, show it, stop."""

from __future__ import annotations

import asyncio

from protos.consensus import ConsensusRecord, GetRequest
from protos.memory import UpsertReply, UpsertRequest
from protos.mission import MissionReply
from shared import bus, demo, stack
from shared.config import Settings
from shared.mission_client import clone_count, run_mission


async def _mission(settings: Settings, progress) -> tuple[MissionReply, ConsensusRecord]:
    nc = await bus.connect(settings, role="client")  # the demo is a user: it needs nothing more
    try:
        progress(f"seeding memory with {len(demo.DOCUMENTS)} documents")
        await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=demo.documents()), UpsertReply, timeout=60)
        mission = demo.mission()
        progress(f"mission: {mission.prompt!r} with {clone_count(mission)} clones")
        reply = await run_mission(nc, mission, progress, timeout=mission.deadline_s + 5)
        record = await bus.request(nc, "magi.consensus.get", GetRequest(id=reply.consensus.id), ConsensusRecord, timeout=10)
        return reply, record
    finally:
        await nc.close()


def describe_synthesis(record: ConsensusRecord) -> str:
    s = record.synthesis
    if s is None:
        return f"answer chosen by {record.strategy} (winner {record.winner}), no synthesis"
    if s.fallback:
        return f"not synthesized ({s.fallback}): the medoid {record.winner} of {', '.join(s.inputs)} is the answer"
    how = "named by the model" if s.citation == "model" else "attributed sentence by sentence by meaning"
    return (f"synthesized by {s.model} on {s.node} in {s.latency_ms:.0f} ms from {', '.join(s.inputs)}; "
            f"cites {', '.join(s.cited) or 'none'} ({how})")


def _running(settings: Settings) -> bool:
    return any(alive for _name, _pid, alive, _restarts in stack.status(settings.home_path))


def run_demo(settings: Settings, *, keep: bool, progress) -> int:
    from shared.cli import print_mission

    started_here = False
    if not _running(settings):
        asyncio.run(stack.up(stack.StackConfig.from_settings(settings), progress))
        started_here = True
    try:
        reply, record = asyncio.run(_mission(settings, progress))
        print_mission(reply)
        print(f"\nread back from SurrealDB: {record.id} with {len(record.votes)} votes, created {record.created_at}")
        print(describe_synthesis(record))
    finally:
        if started_here and not keep:
            stack.down(settings.home_path, progress)
    return 0

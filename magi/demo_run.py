"""`magi demo`: bring the stack up if needed, seed memory, run the seed-000 mission, show it, stop."""

from __future__ import annotations

import asyncio

from magi import demo, stack
from magi.mission_client import clone_count, print_mission, run_mission
from magi.table import Steps, Tally
from protos.consensus import ConsensusRecord, GetRequest
from protos.memory import UpsertReply, UpsertRequest
from protos.mission import MissionReply
from shared import bus
from shared.config import Settings


async def _mission(settings: Settings) -> tuple[MissionReply, ConsensusRecord]:
    nc = await bus.connect(settings, role="client")  # the demo is a user: it needs nothing more
    try:
        with Steps() as steps:
            steps(f"seeding memory with {len(demo.DOCUMENTS)} documents")
            await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=demo.documents()), UpsertReply,
                              timeout=60)
        mission = demo.mission()
        with Tally("clones", clone_count(mission)) as tally:
            tally.note(f"mission: {mission.prompt!r} with {clone_count(mission)} clones")
            reply = await run_mission(nc, mission, tally, timeout=mission.deadline_s + 5)
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


def run_demo(settings: Settings, *, keep: bool) -> int:
    started_here = False
    if not _running(settings):
        with Steps() as steps:
            asyncio.run(stack.up(stack.StackConfig.from_settings(settings), steps))
        started_here = True
    try:
        reply, record = asyncio.run(_mission(settings))
        print_mission(reply)
        print(f"\nread back from SurrealDB: {record.id} with {len(record.votes)} votes, created {record.created_at}")
        print(describe_synthesis(record))
    finally:
        if started_here and not keep:
            with Steps() as steps:
                stack.down(settings.home_path, steps)
    return 0

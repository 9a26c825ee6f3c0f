"""Running a mission from a client while showing each clone as it finishes."""

from __future__ import annotations

import textwrap

import msgspec
from nats.aio.client import Client

from magi.table import render
from protos.mission import CloneResult, MissionReply, MissionRequest
from services.orchestrator.timings import stage_overheads
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


def print_mission(reply) -> None:
    print(f"mission {reply.mission_id}   trace {reply.trace_id}")
    print()
    c = reply.consensus
    made = f"cites {', '.join(c.cited)}" if c.cited else f"winner {c.winner}"
    print(f"consensus ({c.strategy}, agreement {c.agreement:.2f} by {c.similarity or 'words'}, {c.votes} votes, "
          f"{made}):")
    print(textwrap.indent(textwrap.fill(c.answer, 100), "  "))
    print(f"stored as {reply.consensus.id}")
    if reply.context:
        print()
        print(render(["memory hit", "score"], [[h.text[:90], f"{h.score:.3f}"] for h in reply.context]))
    print()
    rows = [[c.clone_id, c.role, c.variation or "-", c.model, c.node, c.replica, f"{c.latency_ms:.0f}",
             "ok" if c.ok else f"failed: {c.error}"] for c in reply.clones]
    print(render(["clone", "role", "variation", "model", "node", "replica", "ms", "result"], rows))
    t = reply.timings
    print(f"\ntotal {t.total_ms:.0f} ms (memory {t.memory_ms:.0f}, clones {t.clones_ms:.0f}, consensus {t.consensus_ms:.0f})")
    print(overhead_line(t))


def overhead_line(t) -> str:
    """The mission's time outside the engines, and each stage's share of it (wall less engine time)."""
    shares = ", ".join(f"{name} {ms:.1f}" for name, ms in stage_overheads(t).items())
    return f"overhead {t.overhead_ms:.1f} ms outside the engines' {t.engine_ms:.0f} ms ({shares})"

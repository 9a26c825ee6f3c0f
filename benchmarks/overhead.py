"""Mission overhead: a mission's time outside the engines, over many missions with tiny generations.

One private stack (NATS, Redis, PostgreSQL, SurrealDB; inference with the default catalogue, memory,
consensus, orchestrator) runs missions one at a time through `magi.mission.run` (the durable front door:
JetStream queue, orchestrator, result store). Each mission searches memory for context, runs a deep clone
and three variations with a 2-token budget, and decides by `medoid` (embeddings, no synthesis); a smaller
set decides by `synthesize` (the heavy model writes the answer). Prompts differ from mission to mission.

From each reply's `timings`: `overhead_ms` = total_ms - engine_ms, where engine_ms is the time the replicas
reported spending inside their engines on the mission's critical path (the query's embedding, the clone
that finished last, consensus's embeddings and synthesis, the answer's embedding); and each stage's share
(its wall time less its engine time). `mission.client_overhead_ms` is the same from the caller's side: the
round trip of `magi.mission.run` less engine_ms, so it adds the queue, the result store and two bus hops
(`mission.outside_run_ms`: that round trip less the orchestrator's total_ms).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

from magi import demo, stack
from magi.procs import free_port
from protos.memory import UpsertReply, UpsertRequest
from protos.mission import MissionReply, MissionRequest
from services.orchestrator.timings import stage_overheads
from shared import bus

log = logging.getLogger("magi.bench.overhead")

MISSIONS = 100  # medoid missions measured (p99 of 100 is the second-largest sample)
SYNTH_MISSIONS = 20  # synthesize missions measured (p50 only)
WARMUP = 5
MAX_TOKENS = 2
SERVICES = ("inference", "memory", "consensus", "orchestrator")
TOPICS = ["schedulers", "message buses", "vector search", "heartbeats", "GPU placement", "job queues",
          "replication", "load balancing", "caching", "backpressure"]


def _mission(i: int, strategy: str) -> MissionRequest:
    topic = TOPICS[i % len(TOPICS)]
    return MissionRequest(prompt=f"In a few words, why do clusters need {topic}? (#{i})", needs_deep_analysis=True,
                          variations=["in one line", "as a haiku", "for a five-year-old"], context_needed=True,
                          max_tokens=MAX_TOKENS, deep_max_tokens=MAX_TOKENS, consensus=strategy, k=3,
                          deadline_s=120.0)


def _pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


async def _run(nc, count: int, strategy: str, first: int, progress) -> list[tuple[MissionReply, float]]:
    """`count` missions one after another; each reply with its round trip (ms) as the caller saw it."""
    out = []
    for i in range(first, first + count):
        if (i - first) % 20 == 0:
            progress(f"{strategy} missions {i - first + 1}-{min(count, i - first + 20)} of {count}")
        t0 = time.perf_counter()
        reply = await bus.request(nc, "magi.mission.run", _mission(i, strategy), MissionReply, timeout=180)
        out.append((reply, (time.perf_counter() - t0) * 1000))
    return out


def _figures(prefix: str, runs: list[tuple[MissionReply, float]], tails: bool) -> dict[str, float]:
    timings = [r.timings for r, _ in runs]
    overhead = [t.overhead_ms for t in timings]
    figures = {f"{prefix}.overhead_ms.p50": _pct(overhead, 0.5)}
    if tails:
        figures[f"{prefix}.overhead_ms.p99"] = _pct(overhead, 0.99)
    shares = [stage_overheads(t) for t in timings]
    for stage in shares[0]:
        figures[f"{prefix}.overhead_ms.{stage}.p50"] = _pct([s[stage] for s in shares], 0.5)
    client = [ms - r.timings.engine_ms for r, ms in runs]
    figures[f"{prefix}.client_overhead_ms.p50"] = _pct(client, 0.5)
    if tails:
        figures[f"{prefix}.client_overhead_ms.p99"] = _pct(client, 0.99)
    # The caller's round trip outside the orchestrator's run: desk, JetStream queue, result store, bus hops.
    outside = [ms - r.timings.total_ms for r, ms in runs]
    figures[f"{prefix}.outside_run_ms.p50"] = _pct(outside, 0.5)
    if tails:
        figures[f"{prefix}.outside_run_ms.p99"] = _pct(outside, 0.99)
    figures[f"{prefix}.total_ms.p50"] = _pct([t.total_ms for t in timings], 0.5)
    figures[f"{prefix}.engine_ms.p50"] = _pct([t.engine_ms for t in timings], 0.5)
    return {k: round(v, 2) for k, v in figures.items()}


async def measure_overhead(progress=lambda _m: None, missions: int = MISSIONS,
                           synth_missions: int = SYNTH_MISSIONS) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="magi-overhead-") as tmp:
        home = Path(tmp)
        cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=SERVICES)
        state = await stack.up(cfg, progress)
        try:
            nc = await stack.connect_as(state.home, state.nats_url)
            try:
                await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=demo.documents()), UpsertReply,
                                  timeout=60)
                progress(f"{WARMUP} untimed missions")
                await _run(nc, WARMUP, "medoid", 10_000, lambda _m: None)
                medoid = await _run(nc, missions, "medoid", 0, progress)
                synthesized = await _run(nc, synth_missions, "synthesize", missions, progress) if synth_missions else []
            finally:
                await nc.close()
        finally:
            stack.down(home, progress)
    figures = _figures("mission", medoid, tails=True)
    if synthesized:
        figures.update(_figures("mission.synthesize", synthesized, tails=False))
    figures["mission.overhead.missions"] = len(medoid)
    log.info("overhead benchmark", extra={"figures": figures,
                                          "overhead_ms_mean": round(statistics.mean(r.timings.overhead_ms
                                                                                    for r, _ in medoid), 2)})
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure_overhead(lambda m: print("...", m, flush=True))), indent=2))

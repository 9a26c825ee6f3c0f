"""Load curves and admission control: throughput and latency as concurrency rises, and refusals past saturation.

One private stack (NATS, Redis, PostgreSQL, SurrealDB; inference with the default catalogue, memory, consensus,
orchestrator). At each concurrency N in LEVELS, N closed-loop clients share a fixed number of requests, each
client sending its next as soon as the last is answered:
- `magi.infer.generate` with a 6-token budget (prompts differ, so no answer is a cache hit);
- `magi.mission.run` with a deep clone and two variations of 4 tokens each, decided by `majority` (embeddings
  and a vote, no synthesis), no memory context.
Figures per level: completed per second (`rps` / `mps`), p50 / p99 latency of the completed ones, the requests
refused at once (a 503 with a retry hint: the admission bound) and how fast a refusal came (p50 ms), and any
other failure (a deadline). A refused client counts the refusal and goes on to its next request; it does not
wait out the hint. A level stops sending after LEVEL_BUDGET_S (a busy machine then gives fewer samples rather
than an endless run), and short deadlines bound what is still in flight.

The bounds are set low enough that concurrency 64 passes them (the defaults are far above 64): the generation
model's `max_queue` is 4 per slot (10 slots, 40 waiting), and MAGI_MISSION_MAX_PENDING is 32 missions. A mission
at 16 at once (the orchestrator's MAGI_MISSION_CONCURRENCY) runs 3 clones each, 48 generations, inside the
generation bound, so missions are refused by their own bound and not by their clones'.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import msgspec
import yaml

from magi import stack
from magi.procs import free_port
from protos.infer import GenerateReply, GenerateRequest
from protos.mission import MissionReply, MissionRequest
from services.inference.catalog import default_catalog
from shared import bus, errors

log = logging.getLogger("magi.bench.load")

LEVELS = (1, 4, 16, 64)
# Requests per level, shared by the clients: enough for a p99 that moves little between runs at low
# concurrency, few enough that the whole benchmark stays within a few minutes on 2 cores.
GENERATE_REQUESTS = {1: 60, 4: 80, 16: 128, 64: 256}
MISSION_REQUESTS = {1: 20, 4: 32, 16: 64, 64: 128}
GENERATE_TOKENS, MISSION_TOKENS = 6, 4
LEVEL_BUDGET_S = {"generate": 20.0, "mission": 30.0}  # per level, after which no new request is sent
GENERATE_TIMEOUT_S, MISSION_DEADLINE_S = 30.0, 30.0
QUEUE_PER_SLOT = 4  # the generation model's max_queue per slot in this benchmark
MAX_PENDING_MISSIONS = 32
SERVICES = ("inference", "memory", "consensus", "orchestrator")
TOPICS = ["schedulers", "message buses", "vector search", "heartbeats", "GPU placement", "job queues",
          "replication", "load balancing", "caching", "backpressure", "consensus", "sharding"]


def _pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); 0 without samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


@dataclass
class Level:
    """One concurrency level's outcome: latencies (ms) of what completed and of what was refused."""

    seconds: float = 0.0
    done_ms: list[float] = field(default_factory=list)
    refused_ms: list[float] = field(default_factory=list)
    failed: int = 0  # any other error (a 503 without a hint, a deadline)

    def figures(self, prefix: str, rate: str) -> dict[str, float]:
        return {f"{prefix}.{rate}": round(len(self.done_ms) / self.seconds, 2) if self.seconds else 0.0,
                f"{prefix}.p50_ms": round(_pct(self.done_ms, 0.5), 1),
                f"{prefix}.p99_ms": round(_pct(self.done_ms, 0.99), 1),
                f"{prefix}.refused": len(self.refused_ms),
                f"{prefix}.refused_p50_ms": round(_pct(self.refused_ms, 0.5), 2),
                f"{prefix}.failed": self.failed}


async def closed_loop(clients: int, requests: int, call: Callable[[int], Awaitable[object]],
                      budget_s: float = float("inf")) -> Level:
    """`requests` calls of `call(i)` by `clients` clients, each sending its next as soon as the last answered,
    none sent after `budget_s`."""
    level, counter = Level(), iter(range(requests))
    stop = time.perf_counter() + budget_s

    async def client() -> None:
        for i in counter:  # shared: each request number is taken once, by whichever client is free
            t0 = time.perf_counter()
            if t0 > stop:
                return
            try:
                await call(i)
            except errors.Unavailable as exc:
                if exc.retry_after_s is None:
                    level.failed += 1
                    log.warning(f"unavailable without a hint: {exc.message[:120]}")
                else:
                    level.refused_ms.append((time.perf_counter() - t0) * 1000)
                continue
            except errors.MagiError as exc:
                level.failed += 1
                log.warning(f"request failed: {exc.code} {exc.message[:120]}")
                continue
            level.done_ms.append((time.perf_counter() - t0) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    level.seconds = time.perf_counter() - started
    return level


def _generate(nc, model: str) -> Callable[[int], Awaitable[object]]:
    async def call(i: int) -> GenerateReply:
        request = GenerateRequest(model=model, prompt=f"Name one thing about {TOPICS[i % len(TOPICS)]} (#{i}).",
                                  max_tokens=GENERATE_TOKENS, temperature=0.7, seed=i, timeout_s=GENERATE_TIMEOUT_S)
        return await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=GENERATE_TIMEOUT_S + 5)

    return call


def _mission(nc) -> Callable[[int], Awaitable[object]]:
    async def call(i: int) -> MissionReply:
        mission = MissionRequest(prompt=f"In a few words, why do clusters need {TOPICS[i % len(TOPICS)]}? (#{i})",
                                 needs_deep_analysis=True, variations=["in one line", "for a five-year-old"],
                                 max_tokens=MISSION_TOKENS, deep_max_tokens=MISSION_TOKENS, consensus="majority",
                                 deadline_s=MISSION_DEADLINE_S)
        return await bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=MISSION_DEADLINE_S + 20)

    return call


def _catalogue() -> tuple[dict, str]:
    """The default catalogue with the generation model's queue bound lowered to QUEUE_PER_SLOT per slot."""
    catalogue = default_catalog()
    generation = next(m for m in catalogue.models if not m.embedding)
    generation.max_queue = QUEUE_PER_SLOT * generation.replicas * generation.max_batch
    return msgspec.to_builtins(catalogue), generation.name


async def _curve(kind: str, call, requests: dict[int, int], rate: str, progress) -> dict[str, float]:
    figures: dict[str, float] = {}
    for clients in LEVELS:
        progress(f"{kind}: {requests[clients]} requests from {clients} client(s)")
        level = await closed_loop(clients, requests[clients], call, LEVEL_BUDGET_S[kind])
        figures.update(level.figures(f"load.{kind}.c{clients}", rate))
    return figures


async def measure_load(progress=lambda _m: None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="magi-load-") as tmp:
        home = Path(tmp)
        catalogue, model = _catalogue()
        (home / "models.yaml").write_text(yaml.safe_dump(catalogue))
        cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=SERVICES,
                                extra_env={"MAGI_MODELS_FILE": str(home / "models.yaml"),
                                           "MAGI_MISSION_MAX_PENDING": str(MAX_PENDING_MISSIONS)})
        state = await stack.up(cfg, progress)
        try:
            nc = await stack.connect_as(state.home, state.nats_url)
            try:
                progress("untimed warm-up: generations and missions")
                await closed_loop(4, 16, _generate(nc, model))
                await closed_loop(2, 4, _mission(nc))
                figures = await _curve("generate", _generate(nc, model), GENERATE_REQUESTS, "rps", progress)
                figures.update(await _curve("mission", _mission(nc), MISSION_REQUESTS, "mps", progress))
            finally:
                await nc.close()
        finally:
            stack.down(home, progress)
    log.info("load benchmark", extra={"figures": figures})
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure_load(lambda m: print("...", m, flush=True))), indent=2))

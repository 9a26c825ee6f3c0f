"""`just bench` / `magi bench`: start a private stack, measure, write benchmarks/results/latest.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.batch import measure_batch_speedup
from benchmarks.bus import measure_auth_overhead, measure_hop
from benchmarks.chaos import measure_chaos, measure_recovery
from benchmarks.consensus import measure_decide
from benchmarks.failover import measure_failover
from benchmarks.gateway import measure_gateway
from benchmarks.infer import measure_tokens_per_s
from benchmarks.memory import measure_memory_recall, measure_memory_scale
from benchmarks.parallel import measure_parallel_speedup
from benchmarks.rpc import measure_rpc_ratio
from benchmarks.sched import measure_placement
from magi import stack
from magi.procs import free_port
from magi.table import render

RESULTS = Path(__file__).resolve().parent / "results"


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


async def _run(home: Path, rounds: int, hop_n: int) -> dict[str, float]:
    cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(),
                            services=("inference", "memory", "consensus"))
    state = await stack.up(cfg, progress)
    try:
        metrics: dict[str, float] = {}
        progress("bus round trips")
        metrics.update(await measure_hop(state.home, state.nats_url, hop_n))
        metrics.update(await measure_tokens_per_s(state.home, state.nats_url, rounds, progress))
        progress("OpenAI-compatible gateway vs the bus (streamed tokens/s, one-token overhead)")
        metrics.update(await measure_gateway(state.home, state.nats_url, progress))
        progress("consensus decisions over 10 answers (embedding call included)")
        metrics.update(await measure_decide(state.home, state.nats_url))
        metrics.update(await measure_memory_recall(state.home, state.nats_url, progress))
        progress("memory search at 100k documents (MemoryStore on the stack's PostgreSQL, throwaway databases)")
        metrics.update(await measure_memory_scale(state.pg_dsn, progress))
        return metrics
    finally:
        stack.down(home, progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="magi bench")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompt set")
    parser.add_argument("--hop-requests", type=int, default=2000)
    parser.add_argument("--home", default=".magi/bench")
    args = parser.parse_args(argv)
    started = time.time()
    progress("placement throughput (1,000 simulated nodes)")
    metrics = measure_placement()
    progress("failover (kill -9 of an agent)")
    metrics.update(asyncio.run(measure_failover()))
    progress("orchestrator kill -9 redelivery; 2 s agent pause")
    metrics.update(asyncio.run(measure_recovery(progress)))
    progress("chaos: kill -9 of every process kind under a stream of missions")
    metrics.update(asyncio.run(measure_chaos(progress)))
    metrics.update(asyncio.run(_run(Path(args.home).resolve(), args.rounds, args.hop_requests)))
    progress("bus round trips with TLS + nkey credentials vs neither")
    metrics.update(asyncio.run(measure_auth_overhead(args.hop_requests)))
    progress("10 generations over N replicas vs 1 replica")
    metrics.update(asyncio.run(measure_parallel_speedup(progress)))
    progress("10 clones on one replica: batched (max_batch 10) vs one at a time")
    metrics.update(asyncio.run(measure_batch_speedup(progress)))
    progress("two llama.cpp RPC shards on loopback vs the unsharded model")
    metrics.update(measure_rpc_ratio(progress))
    result = {
        "metrics": metrics,
        "meta": {"started": started, "seconds": round(time.time() - started, 1), "cpus": os.cpu_count(),
                 "machine": platform.machine(), "python": platform.python_version()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    print(f"\nwritten to {RESULTS / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

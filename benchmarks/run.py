"""`just bench` / `magi bench`: run the measurement groups, write benchmarks/results/latest.json, append the run
to the history and draw the plots (report.py).

    just bench                      every group, as listed in GROUPS
    just bench --only sched,batch   those groups alone (--list names them)
    just bench --compare            the newest run against the one before it; runs nothing
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks import report
from benchmarks.batch import measure_batch_speedup
from benchmarks.bus import measure_auth_overhead, measure_hop
from benchmarks.chaos import measure_chaos, measure_recovery
from benchmarks.consensus import measure_decide
from benchmarks.failover import measure_failover
from benchmarks.gateway import measure_gateway
from benchmarks.infer import measure_tokens_per_s
from benchmarks.load import measure_load
from benchmarks.memory import measure_memory_recall, measure_memory_scale
from benchmarks.model_fetch import measure_model_fetch
from benchmarks.model_scale import measure_model_scale
from benchmarks.overhead import measure_overhead
from benchmarks.parallel import measure_parallel_speedup
from benchmarks.rpc import measure_rpc_ratio
from benchmarks.sched import measure_placement
from benchmarks.seed import measure_seed_table
from benchmarks.vllm_bench import measure_vllm
from magi import stack
from magi.procs import free_port
from magi.table import render

RESULTS = report.RESULTS


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """What a group's measurement gets: the options, and for groups on the shared stack, that stack."""

    args: argparse.Namespace
    home: Path | None = None
    nats_url: str = ""
    pg_dsn: str = ""


@dataclass(frozen=True)
class Group:
    name: str  # what --only takes
    description: str  # the progress line
    measure: Callable[[Run], Any]  # metrics, or a coroutine giving them
    on_stack: bool = False  # needs the private stack (inference, memory, consensus) that such groups share


# In the order they run. A new group is one line here; it is then part of `just bench` and of --only.
GROUPS = [
    Group("sched", "placement: throughput on 1,000 simulated nodes, instances placed vs an exact solver on 120 "
                   "capacity-bound batches, a contended batch's time vs the budget", lambda r: measure_placement()),
    Group("failover", "failover (kill -9 of an agent)", lambda r: measure_failover()),
    Group("recovery", "orchestrator kill -9 redelivery; 2 s agent pause", lambda r: measure_recovery(progress)),
    Group("chaos", "chaos: kill -9 of every process kind under a stream of missions", lambda r: measure_chaos(progress)),
    Group("bus", "bus round trips", lambda r: measure_hop(r.home, r.nats_url, r.args.hop_requests), on_stack=True),
    Group("infer", "tokens/s through MAGI vs llama-cpp-python directly",
          lambda r: measure_tokens_per_s(r.home, r.nats_url, r.args.rounds, progress), on_stack=True),
    Group("gateway", "OpenAI-compatible gateway vs the bus (streamed tokens/s, one-token overhead)",
          lambda r: measure_gateway(r.home, r.nats_url, progress), on_stack=True),
    Group("consensus", "consensus decisions over 10 answers (embedding call included)",
          lambda r: measure_decide(r.home, r.nats_url), on_stack=True),
    Group("memory", "memory recall on the labelled set", lambda r: measure_memory_recall(r.home, r.nats_url, progress),
          on_stack=True),
    Group("memory100k", "memory search at 100k documents (MemoryStore on the stack's PostgreSQL, throwaway databases)",
          lambda r: measure_memory_scale(r.pg_dsn, progress), on_stack=True),
    Group("auth", "bus round trips with TLS + nkey credentials vs neither",
          lambda r: measure_auth_overhead(r.args.hop_requests)),
    Group("parallel", "10 generations over N replicas vs 1 replica", lambda r: measure_parallel_speedup(progress)),
    Group("batch", "10 clones on one replica: batched (max_batch 10) vs one at a time",
          lambda r: measure_batch_speedup(progress)),
    Group("rpc", "two llama.cpp RPC shards on loopback vs the unsharded model", lambda r: measure_rpc_ratio(progress)),
    Group("seed", "seed 000's table: the same work locally (one process, one call after another) and through MAGI",
          lambda r: measure_seed_table(progress)),
    Group("overhead", "mission overhead outside the engines (tiny generations)", lambda r: measure_overhead(progress)),
    Group("load", "load curves: generate and missions at concurrency 1, 4, 16, 64; refusals past the bounds",
          lambda r: measure_load(progress)),
    Group("model_fetch", "model store download into a node cache vs reading and hashing the file",
          lambda r: measure_model_fetch(progress)),
    Group("scale", "a model scaled up at run time vs its load time measured directly",
          lambda r: measure_model_scale(progress)),
    Group("vllm", "vLLM through MAGI vs AsyncLLM in one process; 16 at once vs one at a time (skipped without vLLM "
                  "and a CUDA GPU)", lambda r: measure_vllm(progress)),
]


@dataclass
class Results:
    """A run's figures, and the groups that failed: a broken group costs its own figures, not the run's."""

    metrics: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # group -> what went wrong
    done: set[str] = field(default_factory=set)

    def add(self, group: Group, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        self.done.add(group.name)

    def fail(self, group: Group, exc: BaseException) -> None:
        self.failed[group.name] = f"{type(exc).__name__}: {exc}"[:300]
        progress(f"{group.name} FAILED ({self.failed[group.name]}); going on with the other groups")


async def _on_stack(groups: list[Group], args: argparse.Namespace, results: Results) -> None:
    """The stack groups on one private stack, started once for all of them."""
    home = Path(args.home).resolve()
    cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(),
                            services=("inference", "memory", "consensus"))
    state = await stack.up(cfg, progress)
    try:
        run = Run(args, state.home, state.nats_url, state.pg_dsn)
        for group in groups:
            progress(group.description)
            try:
                result = group.measure(run)
                results.add(group, await result if inspect.iscoroutine(result) else result)
            except Exception as exc:
                results.fail(group, exc)
    finally:
        stack.down(home, progress)


def measure(groups: list[Group], args: argparse.Namespace) -> Results:
    """Each group in turn; the stack groups together, where the first of them stands in the list."""
    results = Results()
    on_stack = [g for g in groups if g.on_stack]
    for group in groups:
        if group.on_stack and group is on_stack[0]:
            try:
                asyncio.run(_on_stack(on_stack, args, results))
            except Exception as exc:  # the stack did not start (or stop): its groups not measured failed with it
                for other in on_stack:
                    if other.name not in results.done | results.failed.keys():
                        results.fail(other, exc)
        if group.on_stack:
            continue
        progress(group.description)
        try:
            result = group.measure(Run(args))
            results.add(group, asyncio.run(result) if inspect.iscoroutine(result) else result)
        except Exception as exc:
            results.fail(group, exc)
    return results


def chosen(only: str) -> list[Group]:
    """The groups --only names (comma-separated), in GROUPS' order; every group when empty."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {g.name for g in GROUPS})
    if unknown:
        raise SystemExit(f"magi bench: unknown group(s) {', '.join(unknown)}; "
                         f"known: {', '.join(g.name for g in GROUPS)}")
    return [g for g in GROUPS if not names or g.name in names]


def compare(history_path: Path) -> int:
    history = report.read_history(history_path)
    if len(history) < 2:
        print(f"nothing to compare: {len(history)} run(s) in {history_path}")
        return 1
    latest, previous = history[-1], history[-2]
    print(f"new: {report.describe(latest)}\nold: {report.describe(previous)} (or, for a metric it lacks, the "
          f"last run that measured it)\n")
    print(render(["metric", "old", "new", "change"], report.compare_rows(history)))
    return 0


def record(results: Results, groups: list[Group], started: float, args: argparse.Namespace) -> None:
    metrics = results.metrics
    entry = report.history_entry(metrics, groups=[g.name for g in groups], seconds=time.time() - started,
                                 failed=results.failed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"started": started, "seconds": entry["seconds"], "cpus": entry["machine"]["cores"],
            "machine": entry["machine"]["arch"], "python": entry["machine"]["python"], "date": entry["date"],
            "commit": entry["commit"], "dirty": entry["dirty"], "groups": entry["groups"], "failed": entry["failed"],
            "host": entry["machine"]}
    latest = {"metrics": metrics, "meta": meta}
    (RESULTS / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    print(render(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    print(f"\nwritten to {RESULTS / 'latest.json'}")
    for name, error in results.failed.items():
        print(f"group {name} FAILED: {error}")
    if args.no_history:
        return
    report.append_history(entry, args.history)
    plots = report.write_plots(entry, RESULTS, progress)
    print(f"appended to {args.history}; plots: {', '.join(p.name for p in plots) or 'none'}; "
          f"`just bench --compare` shows the change against the run before")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="magi bench")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompt set")
    parser.add_argument("--hop-requests", type=int, default=2000)
    parser.add_argument("--home", default=".magi/bench")
    parser.add_argument("--only", default="", help="comma-separated groups to run (see --list); default: all")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--compare", action="store_true",
                        help="show the newest run in the history against the previous one; runs nothing")
    parser.add_argument("--history", type=Path, default=report.HISTORY, help=argparse.SUPPRESS)
    parser.add_argument("--no-history", action="store_true", help="write latest.json only: no history line, no plots")
    args = parser.parse_args(argv)
    if args.list:
        print(render(["group", "measures"], [[g.name, g.description] for g in GROUPS]))
        return 0
    if args.compare:
        return compare(args.history)
    groups = chosen(args.only)
    started = time.time()
    results = measure(groups, args)
    record(results, groups, started, args)
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())

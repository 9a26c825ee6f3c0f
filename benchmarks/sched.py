"""Placement through the scheduler's own code: throughput (10,000 instances on 1,000 simulated nodes, the
greedy fast path), instances placed on capacity-bound batches against an exact solver, and the time a
contended batch takes against the solver's budget."""

from __future__ import annotations

import random
import time

from protos.sched import InstanceSpec
from services.scheduler.batch import DEFAULT_BUDGET_S, place_all
from services.scheduler.cluster import NodeConfig
from services.scheduler.placement import Placer
from services.scheduler.solver import solve

KINDS = [  # (type, ram_gb, gpu, gpu_memory_gb, max_instances, reserved)
    ("host", 128.0, True, 24.0, 32, 16.0),
    ("host", 64.0, False, 0.0, 24, 8.0),
    ("jetson_orin", 64.0, True, 64.0, 12, 8.0),
    ("raspberry_pi", 8.0, False, 0.0, 4, 1.0),
    ("generic", 32.0, False, 0.0, 16, 4.0),
]


def simulated_cluster(n_nodes: int, rng: random.Random) -> list[NodeConfig]:
    nodes = []
    for i in range(n_nodes):
        kind, ram, gpu, gpu_mem, max_i, reserved = rng.choice(KINDS)
        nodes.append(NodeConfig(name=f"node{i:05d}", type=kind, ram_gb=ram, gpu=gpu, gpu_memory_gb=gpu_mem,
                                max_instances=max_i, reserved_ram_gb=reserved))
    return nodes


def simulated_instances(n: int, n_nodes: int, rng: random.Random) -> list[InstanceSpec]:
    specs = []
    for i in range(n):
        gpu = rng.random() < 0.15
        specs.append(InstanceSpec(
            instance_id=f"inst{i:06d}", ram_gb=rng.choice([0.5, 1.0, 2.0, 4.0, 6.0]), gpu_required=gpu,
            gpu_memory_gb=rng.choice([0.0, 2.0, 4.0]) if gpu else 0.0,
            preferred_node=f"node{rng.randrange(n_nodes):05d}" if rng.random() < 0.1 else "",
            anti_affinity=[f"inst{i - 1:06d}"] if i and rng.random() < 0.1 else [],
        ))
    return specs


def measure_placement(n_nodes: int = 1000, n_instances: int = 10_000, seed: int = 7, *,
                      packing: bool = True) -> dict[str, float]:
    """Throughput on the fast path; with `packing`, the capacity-bound figures as well (about a minute)."""
    rng = random.Random(seed)
    nodes = simulated_cluster(n_nodes, rng)
    specs = simulated_instances(n_instances, n_nodes, rng)
    placer = Placer(nodes)
    started = time.perf_counter()
    result = place_all(placer, specs)
    seconds = time.perf_counter() - started
    metrics = {
        f"sched.placements_per_s.{n_nodes}_nodes": round(len(specs) / seconds, 1),
        f"sched.placed.{n_nodes}_nodes": len(result.placements),
        f"sched.unplaced.{n_nodes}_nodes": len(result.unplaced),
    }
    if packing:
        metrics.update(measure_packing())
        metrics.update(measure_contended())
    return metrics


# ---- capacity-bound batches: placed vs an exact solver, and the time a contended batch takes ----------------

SMALL_KINDS = [  # (type, ram_gb, gpu, gpu_memory_gb, max_instances, reserved): seed 002's kinds, mixed
    ("jetson_orin", 64.0, True, 64.0, 4, 8.0),
    ("raspberry_pi", 8.0, False, 0.0, 1, 1.0),
    ("host", 128.0, True, 24.0, 8, 16.0),
    ("host", 64.0, False, 0.0, 6, 8.0),
    ("generic", 32.0, True, 16.0, 3, 4.0),
    ("generic", 16.0, False, 0.0, 2, 2.0),
]


def bound_cluster(rng: random.Random) -> list[NodeConfig]:
    nodes = []
    for i in range(rng.randint(4, 8)):
        kind, ram, gpu, gpu_mem, max_i, reserved = rng.choice(SMALL_KINDS)
        nodes.append(NodeConfig(name=f"n{i}", type=kind, ram_gb=ram, gpu=gpu, gpu_memory_gb=gpu_mem,
                                max_instances=max_i, reserved_ram_gb=reserved))
    return nodes


def bound_instances(nodes: list[NodeConfig], rng: random.Random, count: int | None = None) -> list[InstanceSpec]:
    """12-30 instances asking, in all, 0.9-1.5 times the cluster's usable RAM: not everything fits."""
    count = count or rng.randint(12, 30)
    usable = sum(n.ram_gb - n.reserved_ram_gb for n in nodes)
    weights = [rng.choice([1, 2, 3, 4, 6, 8]) for _ in range(count)]
    scale = usable * rng.uniform(0.9, 1.5) / sum(weights)
    specs = []
    for i, weight in enumerate(weights):
        gpu = rng.random() < 0.3
        specs.append(InstanceSpec(
            instance_id=f"i{i:02d}", ram_gb=max(0.5, round(weight * scale * 2) / 2), gpu_required=gpu,
            gpu_preferred=not gpu and rng.random() < 0.3,
            gpu_memory_gb=rng.choice([4.0, 8.0, 12.0, 16.0]) if gpu else 0.0,
            anti_affinity=[f"i{rng.randrange(i):02d}"] if i and rng.random() < 0.2 else [],
        ))
    return specs


def exact_count(nodes: list[NodeConfig], specs: list[InstanceSpec]) -> int:
    """The most instances any placement holds: CP-SAT on the count alone, with no time limit to speak of."""
    placer = Placer(nodes)
    placer.note_anti_affinity(specs)
    solved = solve(placer, specs, budget_s=600.0, score=False, workers=2)
    assert solved is not None and solved.score_proven, "the reference solve must finish"
    return len(solved.where)


def measure_packing(batches: int = 120, seed: int = 14, budget_s: float = DEFAULT_BUDGET_S) -> dict[str, float]:
    """MAGI's placements (greedy, then CP-SAT within the budget) against the exact maximum, batch by batch;
    the greedy scorer alone beside it, measured on the same batches."""
    rng = random.Random(seed)
    placed = greedy = best = proven = 0
    worst = 1.0
    for _ in range(batches):
        nodes = bound_cluster(rng)
        specs = bound_instances(nodes, rng)
        result = place_all(Placer(nodes), specs, budget_s=budget_s)
        alone = place_all(Placer(nodes), specs, budget_s=0.0)
        reference = exact_count(nodes, specs)
        placed, greedy, best = placed + len(result.placements), greedy + len(alone.placements), best + reference
        proven += result.optimal
        worst = min(worst, len(result.placements) / reference if reference else 1.0)
    return {"sched.placed_vs_optimal": round(placed / best, 4), "sched.placed_vs_optimal.greedy": round(greedy / best, 4),
            "sched.placed_vs_optimal.worst_batch": round(worst, 4),
            "sched.placed_vs_optimal.proven_share": round(proven / batches, 3), "sched.placed_vs_optimal.batches": batches}


def measure_contended(batches: int = 200, seed: int = 30, budget_s: float = DEFAULT_BUDGET_S) -> dict[str, float]:
    """Wall time of one 30-instance batch that does not all fit, through `place_all`, at p50 and p99."""
    rng = random.Random(seed)
    times = []
    for _ in range(batches):
        nodes = bound_cluster(rng)
        specs = bound_instances(nodes, rng, count=30)
        started = time.perf_counter()
        place_all(Placer(nodes), specs, budget_s=budget_s)
        times.append((time.perf_counter() - started) * 1000.0)
    times.sort()
    return {"sched.place_ms.p99_contended": round(times[int(0.99 * (len(times) - 1))], 1),
            "sched.place_ms.p50_contended": round(times[len(times) // 2], 1),
            "sched.place_budget_ms": round(budget_s * 1000.0, 1)}

"""Placement throughput: 10,000 instances on 1,000 simulated nodes through the scheduler's own code."""

from __future__ import annotations

import random
import time

from protos.sched import InstanceSpec
from services.scheduler.batch import place_all
from services.scheduler.cluster import NodeConfig
from services.scheduler.placement import Placer

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


def measure_placement(n_nodes: int = 1000, n_instances: int = 10_000, seed: int = 7) -> dict[str, float]:
    rng = random.Random(seed)
    nodes = simulated_cluster(n_nodes, rng)
    specs = simulated_instances(n_instances, n_nodes, rng)
    placer = Placer(nodes)
    started = time.perf_counter()
    result = place_all(placer, specs)
    seconds = time.perf_counter() - started
    return {
        f"sched.placements_per_s.{n_nodes}_nodes": round(len(specs) / seconds, 1),
        f"sched.placed.{n_nodes}_nodes": len(result.placements),
        f"sched.unplaced.{n_nodes}_nodes": len(result.unplaced),
    }

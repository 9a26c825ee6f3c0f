"""Placement: the seed-002 algorithm made exact, deterministic and fast.

Hard constraints (a placement that breaks one never happens): the node is healthy and below
max_instances; RAM after reserved_ram_gb and what is already allocated; GPU required but none; GPU
memory; GPUs held exclusively (`gpus`, where the node's GPU count is known); room for a model the node's cache lacks (download_gb); anti-affinity (symmetric). Among the nodes
left, a 0-100 score with the seed's weights picks one (a node holding the model wins a tie); model-serving coordinators use seed 001's score instead (free RAM + GPU memory + 5 GB GPU bonus
- model size). Scores are computed for all nodes at once with numpy, so one placement costs tens of
microseconds at a thousand nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protos.sched import InstanceSpec
from services.scheduler.cluster import NodeConfig, ScoreWeights

GPU_BONUS_GB = 5.0  # seed 001: "GPU nodes get 5GB bonus"
# A node that already holds a replica's model (its digest in the node's cache) wins a tie: a point of the seed's
# 0-100 score, a megabyte of seed 001's. Small on purpose: it decides between nodes otherwise equal, it does not
# outweigh RAM, load or a preferred node.
HOLDS_MODEL_BONUS = 1.0
EFFICIENT_BAND = (0.30, 0.70)  # seed 002: 30-70 % RAM use after placing is preferred


Weights = ScoreWeights


@dataclass
class PlacementResult:
    placements: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    optimal: bool = True  # proven: no placement within the hard constraints places more of the batch
    score_optimal: bool = False  # proven too: none of that size has a better score (the solver finished)
    method: str = "greedy"  # or "cp-sat": greedy left something unplaced and the solver searched
    solve_ms: float = 0.0
    explanations: dict = field(default_factory=dict)  # instance id -> explain.Explanation, when asked


def needs_gpu(spec: InstanceSpec) -> bool:
    """An instance that holds a GPU needs a GPU node, whether or not it says gpu_required."""
    return spec.gpu_required or spec.gpus > 0


def coordinator_score_mb(free_ram_gb: float, gpu_memory_gb: float, gpu: bool, model_size_gb: float) -> float:
    """Seed 001, in its MB units: 128 GB RAM + 24 GB GPU for a 143,360 MB model scores 13,640."""
    return (free_ram_gb + gpu_memory_gb + (GPU_BONUS_GB if gpu else 0.0) - model_size_gb) * 1000.0


class Placer:
    """The cluster's capacity and allocations as arrays indexed by node (sorted by name)."""

    def __init__(self, nodes: list[NodeConfig], weights: Weights | None = None,
                 unavailable: set[str] | frozenset[str] = frozenset()) -> None:
        nodes = sorted(nodes, key=lambda n: n.name)
        self.weights = weights or Weights()
        self.names = [n.name for n in nodes]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.total = np.array([n.ram_gb for n in nodes], dtype=float)
        self.usable = np.array([n.ram_gb - n.reserved_ram_gb for n in nodes], dtype=float)
        self.gpu = np.array([n.gpu for n in nodes], dtype=bool)
        self.gpu_total = np.array([n.gpu_memory_gb for n in nodes], dtype=float)
        self.gpu_count = np.array([n.gpu_count for n in nodes], dtype=np.int64)  # 0: not known, not limited
        self.max_instances = np.array([n.max_instances for n in nodes], dtype=np.int64)
        self.healthy = np.array([n.name not in unavailable for n in nodes], dtype=bool)
        self.models = [frozenset(n.models) for n in nodes]
        self.model_room = np.array([np.inf if n.model_room_gb is None else n.model_room_gb for n in nodes], dtype=float)
        self.ram_alloc = np.zeros(len(nodes))
        self.gpu_alloc = np.zeros(len(nodes))
        self.gpu_used = np.zeros(len(nodes), dtype=np.int64)
        self.count = np.zeros(len(nodes), dtype=np.int64)
        self.where: dict[str, int] = {}
        self.specs: dict[str, InstanceSpec] = {}
        self.anti: dict[str, set[str]] = {}  # symmetric anti-affinity, filled as specs arrive

    # ---- bookkeeping -----------------------------------------------------------------------------

    def assign(self, spec: InstanceSpec, node: int) -> None:
        self.where[spec.instance_id] = node
        self.specs[spec.instance_id] = spec
        self.ram_alloc[node] += spec.ram_gb
        self.gpu_alloc[node] += spec.gpu_memory_gb
        self.gpu_used[node] += spec.gpus
        self.count[node] += 1

    def unassign(self, instance_id: str) -> InstanceSpec:
        node = self.where.pop(instance_id)
        spec = self.specs.pop(instance_id)
        self.ram_alloc[node] -= spec.ram_gb
        self.gpu_alloc[node] -= spec.gpu_memory_gb
        self.gpu_used[node] -= spec.gpus
        self.count[node] -= 1
        return spec

    def note_anti_affinity(self, specs: list[InstanceSpec]) -> None:
        for spec in specs:
            for other in spec.anti_affinity:
                self.anti.setdefault(spec.instance_id, set()).add(other)
                self.anti.setdefault(other, set()).add(spec.instance_id)

    # ---- constraints and scores ------------------------------------------------------------------

    def feasible(self, spec: InstanceSpec) -> np.ndarray:
        mask = self.healthy & (self.count < self.max_instances)
        mask &= self.usable - self.ram_alloc >= spec.ram_gb - 1e-9
        if needs_gpu(spec):
            mask &= self.gpu
        if spec.gpu_memory_gb > 0:
            mask &= self.gpu & (self.gpu_total - self.gpu_alloc >= spec.gpu_memory_gb - 1e-9)
        if spec.gpus > 0:
            mask &= ~self.short_of_gpus(spec)
        mask &= ~self.no_room(spec)
        for other in self.anti.get(spec.instance_id, ()):
            node = self.where.get(other)
            if node is not None:
                mask[node] = False
        return mask

    def short_of_gpus(self, spec: InstanceSpec) -> np.ndarray:
        """Nodes whose known GPU count, less the GPUs held by what is placed, is below the instance's `gpus`
        (a node that does not report its GPUs is not limited: its GPU memory still is)."""
        return (spec.gpus > 0) & (self.gpu_count > 0) & (self.gpu_count - self.gpu_used < spec.gpus)

    def holds(self, spec: InstanceSpec) -> np.ndarray:
        """Nodes whose model cache holds the instance's model already."""
        return np.array([bool(spec.model_digest) and spec.model_digest in held for held in self.models], dtype=bool)

    def no_room(self, spec: InstanceSpec) -> np.ndarray:
        """Nodes that lack the instance's model and cannot take its download (each download of a batch is
        checked against the node's room alone: replicas of one model share a file)."""
        if spec.download_gb <= 0:
            return np.zeros(len(self.names), dtype=bool)
        return ~self.holds(spec) & (self.model_room < spec.download_gb - 1e-9)

    def scores(self, spec: InstanceSpec) -> np.ndarray:
        if spec.model_size_gb > 0:
            free = self.usable - self.ram_alloc
            gpu_free = np.where(self.gpu, self.gpu_total - self.gpu_alloc, 0.0)
            return ((free + gpu_free + np.where(self.gpu, GPU_BONUS_GB, 0.0) - spec.model_size_gb) * 1000.0
                    + HOLDS_MODEL_BONUS * self.holds(spec))
        w = self.weights
        low, high = EFFICIENT_BAND
        util = (self.ram_alloc + spec.ram_gb) / self.total
        distance = np.maximum(low - util, 0.0) + np.maximum(util - high, 0.0)
        score = w.resource_efficiency * np.clip(1.0 - distance / low, 0.0, 1.0)
        score += w.load_balancing * (1.0 - self.count / np.maximum(self.max_instances, 1))
        if needs_gpu(spec) or spec.gpu_preferred or spec.gpu_memory_gb > 0:
            score += np.where(self.gpu, w.gpu_preference, 0.0)
        else:  # keep GPU nodes for the instances that need them
            score += np.where(self.gpu, w.gpu_preference / 3.0, w.gpu_preference)
        if spec.affinity:
            peers = np.zeros(len(self.names))
            for other in spec.affinity:
                node = self.where.get(other)
                if node is not None:
                    peers[node] += 1.0
            score += w.affinity * peers / len(spec.affinity)
        preferred = self.index.get(spec.preferred_node)
        if preferred is not None:
            score[preferred] += w.preferred_node
        return score + HOLDS_MODEL_BONUS * self.holds(spec)

    def choose(self, spec: InstanceSpec) -> int | None:
        mask = self.feasible(spec)
        if not mask.any():
            return None
        score = np.where(mask, self.scores(spec), -np.inf)
        return int(np.argmax(score))  # first maximum: ties go to the name that sorts first

    def why_not(self, spec: InstanceSpec, node: int | None = None) -> str:
        """The hard constraint that rules out the node (or, with none given, every node)."""
        reasons = self._first_failures(spec)
        if node is not None:
            return self._reason(spec, node, reasons[node])
        shown = [self._reason(spec, i, reasons[i]) for i in range(min(3, len(self.names)))]
        more = len(self.names) - len(shown)
        return f"no node fits ({'; '.join(shown)}{f'; and {more} more' if more else ''})"

    def _first_failures(self, spec: InstanceSpec) -> np.ndarray:
        """Per node, the first hard constraint it breaks (0-6, or 7: only anti-affinity), vectorised."""
        checks = [
            ~self.healthy,
            self.count >= self.max_instances,
            ~self.gpu if needs_gpu(spec) else np.zeros(len(self.names), dtype=bool),
            self.usable - self.ram_alloc < spec.ram_gb - 1e-9,
            (spec.gpu_memory_gb > 0) & (~self.gpu | (self.gpu_total - self.gpu_alloc < spec.gpu_memory_gb - 1e-9)),
            self.short_of_gpus(spec),
            self.no_room(spec),
        ]
        first = np.full(len(self.names), len(checks), dtype=np.int64)
        for code in reversed(range(len(checks))):
            first[checks[code]] = code
        return first

    def _reason(self, spec: InstanceSpec, i: int, code: int) -> str:
        name = self.names[i]
        if code == 0:
            return f"{name} is not healthy"
        if code == 1:
            return f"{name} is at max_instances ({self.max_instances[i]})"
        if code == 2:
            return f"{name} has no GPU"
        if code == 3:
            return f"{name} has {self.usable[i] - self.ram_alloc[i]:.1f} GB RAM free, needs {spec.ram_gb:g}"
        if code == 4:
            free = self.gpu_total[i] - self.gpu_alloc[i] if self.gpu[i] else 0.0
            return f"{name} has {free:.1f} GB GPU memory free, needs {spec.gpu_memory_gb:g}"
        if code == 5:
            free_gpus = self.gpu_count[i] - self.gpu_used[i]
            return f"{name} has {free_gpus} of {self.gpu_count[i]} GPUs free, needs {spec.gpus}"
        if code == 6:
            return f"{name} has room for {self.model_room[i]:.1f} GB of models, the model to download is {spec.download_gb:g}"
        return f"{name} holds an anti-affine instance"

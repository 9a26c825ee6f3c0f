"""Exact placement with OR-Tools CP-SAT: as many instances as the hard constraints allow, then the seed's score.

One model, two objectives in strict order: every placed instance is worth more than the best possible
total score, so the solver never trades an instance for a better score. The score of an instance on a
node is the seed-002 score (`Placer.scores`) against the cluster as it stands before the batch, plus the
seed's affinity bonus between instances of the batch that land together. The greedy scorer, by contrast,
scores each instance against the ones placed before it; the two agree on every term but the RAM band and
the load balance, which the solver sees per instance rather than per batch.

The solve runs under a wall-clock budget; the best solution found by then is used, and `Solved` says what
the solver proved: that no placement places more (`count_proven`), and that none of that size scores
better (`score_proven`). The caller's greedy placement is given as a hint, so the answer is never worse.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from protos.sched import InstanceSpec
from services.scheduler.placement import Placer

MILLI = 1000  # capacities in thousandths of a GB: CP-SAT works in integers
SCORE_SCALE = 10  # seed scores (0-100) to integers with one decimal kept
# A move in a rebalance costs this much score (seed points): half a preferred node, so a move must buy
# more than a cosmetic gain.
MOVE_COST_POINTS = 5.0
# Kept out of the solver's share of the budget: reading the solution back, and CP-SAT overshooting its limit
# when the machine is busy (measured up to ~6 ms over on 2 shared cores).
SOLVE_OVERHEAD_S = 0.012
SOLVE_OVERHEAD_SHARE = 0.08
SEED = 2002  # CP-SAT's random seed: the same model and budget give the same answer


@dataclass
class Solved:
    where: dict[str, int]  # instance id -> node index
    count_proven: bool
    score_proven: bool
    status: str  # CP-SAT's: OPTIMAL, FEASIBLE


def solve(placer: Placer, specs: list[InstanceSpec], *, budget_s: float, hint: dict[str, int] | None = None,
          must_place: set[str] = frozenset(), current: dict[str, int] | None = None, score: bool = True,
          workers: int = 1) -> Solved | None:
    """Place `specs` (none of them in the placer yet) around what the placer holds, all within `budget_s`
    of the call (building the model included).

    `must_place`: ids that must be placed (a rebalance never drops a running instance); `current`: where
    instances run now, each move away costing MOVE_COST_POINTS; `score` False: the count alone (the
    benchmark's reference). None when the solver found no solution in the budget (or, with `must_place`,
    none exists)."""
    deadline = time.perf_counter() + budget_s
    build = _Model(placer, specs, current or {})
    build.constrain(must_place)
    build.objective(score)
    for i, spec in enumerate(specs):
        node = (hint or {}).get(spec.instance_id)
        for n, var in build.vars[i].items():
            build.model.AddHint(var, n == node)
    solver = cp_model.CpSolver()
    margin = SOLVE_OVERHEAD_S + SOLVE_OVERHEAD_SHARE * budget_s
    solver.parameters.max_time_in_seconds = max(deadline - time.perf_counter() - margin, 0.001)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = SEED
    status = solver.Solve(build.model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    where = {specs[i].instance_id: n for i, nodes in enumerate(build.vars) for n, var in nodes.items()
             if solver.BooleanValue(var)}
    optimal = status == cp_model.OPTIMAL
    # The bound caps any solution's value: one more instance would be worth BIG, less at most every move.
    bound = solver.BestObjectiveBound()
    count_proven = optimal or bound < build.big * (len(where) + 1) - build.max_penalty
    return Solved(where=where, count_proven=count_proven, score_proven=optimal, status=solver.StatusName(status))


class _Model:
    """The CP-SAT model of one batch: a boolean per (instance, node) that passes every static check."""

    def __init__(self, placer: Placer, specs: list[InstanceSpec], current: dict[str, int]) -> None:
        self.placer = placer
        self.specs = specs
        self.current = current
        self.model = cp_model.CpModel()
        self.index = {s.instance_id: i for i, s in enumerate(specs)}
        self.vars: list[dict[int, cp_model.IntVar]] = []
        self.soft: list[dict[int, int]] = []
        for spec in specs:
            mask = placer.feasible(spec)
            scores = _integer_scores(placer.scores(spec), mask, coordinator=spec.model_size_gb > 0)
            nodes = [int(n) for n in np.flatnonzero(mask)]
            self.vars.append({n: self.model.NewBoolVar(f"x{len(self.vars)}_{n}") for n in nodes})
            self.soft.append({n: int(scores[n]) for n in nodes})
        self.placed = [self.model.NewBoolVar(f"p{i}") for i in range(len(specs))]
        self.big = 1
        self.max_penalty = 0

    def constrain(self, must_place: set[str]) -> None:
        model, placer = self.model, self.placer
        for i, nodes in enumerate(self.vars):
            model.Add(sum(nodes.values()) == self.placed[i])
            if self.specs[i].instance_id in must_place:
                model.Add(self.placed[i] == 1)
        for n in range(len(placer.names)):
            here = [(self.specs[i], nodes[n]) for i, nodes in enumerate(self.vars) if n in nodes]
            if not here:
                continue
            model.Add(sum(v for _, v in here) <= int(placer.max_instances[n] - placer.count[n]))
            model.Add(sum(_milli_up(s.ram_gb) * v for s, v in here)
                      <= _milli_down(placer.usable[n] - placer.ram_alloc[n]))
            gpu = [(s, v) for s, v in here if s.gpu_memory_gb > 0]
            if gpu:
                model.Add(sum(_milli_up(s.gpu_memory_gb) * v for s, v in gpu)
                          <= _milli_down(placer.gpu_total[n] - placer.gpu_alloc[n]))
            holders = [(s, v) for s, v in here if s.gpus > 0] if placer.gpu_count[n] > 0 else []
            if holders:  # GPUs held exclusively, where the node's count is known
                model.Add(sum(s.gpus * v for s, v in holders) <= int(placer.gpu_count[n] - placer.gpu_used[n]))
        for a, b in self._anti_pairs():
            for n in self.vars[a].keys() & self.vars[b].keys():
                model.AddBoolOr([self.vars[a][n].Not(), self.vars[b][n].Not()])
        for members in self._gangs():
            for other in members[1:]:
                model.Add(self.placed[other] == self.placed[members[0]])

    def objective(self, score: bool = True) -> None:
        if not score:
            self.model.Maximize(sum(self.placed))
            return
        terms, best = [], 0
        for i, nodes in enumerate(self.vars):
            terms += [self.soft[i][n] * var for n, var in nodes.items()]
            best += max(self.soft[i].values(), default=0)
        bonus, extra = self._affinity_terms()
        terms += bonus
        best += extra
        penalty = []
        cost = int(MOVE_COST_POINTS * SCORE_SCALE)
        for instance_id, node in self.current.items():
            i = self.index.get(instance_id)
            if i is not None and node in self.vars[i]:
                penalty.append(cost * (1 - self.vars[i][node]))
        self.max_penalty = cost * len(penalty)
        self.big = best + self.max_penalty + 1  # one more instance outweighs any score and every move
        self.model.Maximize(self.big * sum(self.placed) + sum(terms) - sum(penalty))

    def _affinity_terms(self) -> tuple[list, int]:
        """The seed's affinity bonus for batch peers sharing a node: weight / len(affinity) per peer."""
        weight = self.placer.weights.affinity * SCORE_SCALE
        terms, best = [], 0
        for i, spec in enumerate(self.specs):
            peers = [self.index[p] for p in spec.affinity if p in self.index and p != spec.instance_id]
            if not peers or spec.model_size_gb > 0:
                continue
            share = int(round(weight / len(spec.affinity)))
            for j in peers:
                for n in self.vars[i].keys() & self.vars[j].keys():
                    both = self.model.NewBoolVar("")
                    self.model.AddImplication(both, self.vars[i][n])
                    self.model.AddImplication(both, self.vars[j][n])
                    terms.append(share * both)
                best += share
        return terms, best

    def _anti_pairs(self) -> set[tuple[int, int]]:
        pairs = set()
        for i, spec in enumerate(self.specs):
            for other in spec.anti_affinity:
                j = self.index.get(other)
                if j is not None and j != i:
                    pairs.add((min(i, j), max(i, j)))
        for instance_id, others in self.placer.anti.items():  # anti-affinity named by either side
            i = self.index.get(instance_id)
            for other in others:
                j = self.index.get(other)
                if i is not None and j is not None and i != j:
                    pairs.add((min(i, j), max(i, j)))
        return pairs

    def _gangs(self) -> list[list[int]]:
        groups: dict[str, list[int]] = {}
        for i, spec in enumerate(self.specs):
            if spec.group:
                groups.setdefault(spec.group, []).append(i)
        return [members for members in groups.values() if len(members) > 1]


def seed_points(placer: Placer, spec: InstanceSpec) -> np.ndarray:
    """Per node, the seed score the solver gives `spec` there (0-100, one decimal); 0 where it cannot go."""
    mask = placer.feasible(spec)
    return _integer_scores(placer.scores(spec), mask, coordinator=spec.model_size_gb > 0) / SCORE_SCALE * mask


def _integer_scores(scores: np.ndarray, mask: np.ndarray, coordinator: bool) -> np.ndarray:
    """Seed-002 scores (0-100) scaled to integers; seed-001 coordinator scores (MB, any sign) mapped onto
    the same 0-100 range over the nodes that can take the instance, so neither kind outweighs the other."""
    if not mask.any():
        return np.zeros(len(scores), dtype=np.int64)
    if coordinator:
        low, high = float(scores[mask].min()), float(scores[mask].max())
        scores = (scores - low) / (high - low) * 100.0 if high > low else np.full(len(scores), 100.0)
    return np.rint(np.clip(scores, 0.0, None) * SCORE_SCALE).astype(np.int64)


def _milli_up(gb: float) -> int:
    return int(math.ceil(gb * MILLI - 1e-6))


def _milli_down(gb: float) -> int:
    return max(int(math.floor(gb * MILLI + 1e-6)), 0)

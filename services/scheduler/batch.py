"""Batch placement (`place_all`): deterministic, hardest first, gangs all-or-nothing, explicit
placements honoured (never against a hard constraint), and a bounded search when greedy falls short.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np

from protos.sched import InstanceSpec
from services.scheduler.placement import PlacementResult, Placer

SEARCH_MAX_INSTANCES = 16  # above this, greedy alone (a full search is exponential)
SEARCH_BUDGET = 20_000  # node visits per search


def difficulty(spec: InstanceSpec) -> tuple:
    """Hardest first: GPU required, then most GPU memory, then most RAM; the id breaks ties."""
    return (not spec.gpu_required, -spec.gpu_memory_gb, -spec.ram_gb, not spec.gpu_preferred, spec.instance_id)


def place_all(placer: Placer, instances: list[InstanceSpec], explicit: dict[str, str] | None = None) -> PlacementResult:
    """Place `instances` around whatever the placer already holds (running instances never move)."""
    explicit = explicit or {}
    placer.note_anti_affinity(instances)
    batch = sorted((s for s in instances if s.instance_id not in placer.where), key=difficulty)
    unplaced: dict[str, str] = {}
    _place_explicit(placer, [s for s in batch if s.instance_id in explicit], explicit, unplaced)
    rest = [s for s in batch if s.instance_id not in explicit]
    gangs = [s for s in rest if s.group]
    singles = [s for s in rest if not s.group]
    for _name, members in groupby(sorted(gangs, key=lambda s: (s.group, difficulty(s))), key=lambda s: s.group):
        _place_gang(placer, sorted(members, key=difficulty), unplaced)
    for spec in singles:
        node = placer.choose(spec)
        if node is None:
            unplaced[spec.instance_id] = placer.why_not(spec)
        else:
            placer.assign(spec, node)
    if unplaced and len(rest) <= SEARCH_MAX_INSTANCES:
        if _search(placer, rest):
            unplaced = {k: v for k, v in unplaced.items() if k not in {s.instance_id for s in rest}}
    result = PlacementResult(unplaced=unplaced)
    for spec in batch:
        node = placer.where.get(spec.instance_id)
        if node is not None:
            result.placements[spec.instance_id] = placer.names[node]
    return result


def _place_explicit(placer: Placer, specs: list[InstanceSpec], explicit: dict[str, str], unplaced: dict) -> None:
    for spec in specs:
        name = explicit[spec.instance_id]
        node = placer.index.get(name)
        if node is None:
            unplaced[spec.instance_id] = f"explicit node {name!r} is not in the cluster"
        elif not placer.feasible(spec)[node]:
            unplaced[spec.instance_id] = f"explicit node refused: {placer.why_not(spec, node)}"
        else:
            placer.assign(spec, node)


def _place_gang(placer: Placer, members: list[InstanceSpec], unplaced: dict) -> None:
    placed = []
    for spec in members:
        node = placer.choose(spec)
        if node is None:
            for done in placed:
                placer.unassign(done)
            reason = f"gang {spec.group!r}: {spec.instance_id}: {placer.why_not(spec)}"
            for member in members:
                unplaced[member.instance_id] = reason
            return
        placer.assign(spec, node)
        placed.append(spec.instance_id)


def _search(placer: Placer, specs: list[InstanceSpec]) -> bool:
    """Depth-first search for a placement of every spec (greedy found none); keeps greedy's if it fails."""
    before = {s.instance_id: placer.where[s.instance_id] for s in specs if s.instance_id in placer.where}
    for instance_id in before:
        placer.unassign(instance_id)
    budget = [SEARCH_BUDGET]
    if _dfs(placer, specs, 0, budget):
        return True
    for spec in specs:
        if spec.instance_id in placer.where:
            placer.unassign(spec.instance_id)
    for spec in specs:
        if spec.instance_id in before:
            placer.assign(spec, before[spec.instance_id])
    return False


def _dfs(placer: Placer, specs: list[InstanceSpec], i: int, budget: list[int]) -> bool:
    if i == len(specs):
        return True
    spec = specs[i]
    mask = placer.feasible(spec)
    if not mask.any():
        return False
    order = np.argsort(-np.where(mask, placer.scores(spec), -np.inf), kind="stable")
    for node in order[: int(mask.sum())]:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        placer.assign(spec, int(node))
        if _dfs(placer, specs, i + 1, budget):
            return True
        placer.unassign(spec.instance_id)
    return False

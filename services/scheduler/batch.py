"""Batch placement (`place_all`): deterministic, hardest first, gangs all-or-nothing, explicit
placements honoured (never against a hard constraint).

Two objectives, in order: place as many instances as the hard constraints allow, then prefer the seed's
score. The greedy scorer is the fast path: when it places the whole batch, no placement places more, and
its answer stands. When it leaves something unplaced, CP-SAT (services.scheduler.solver) searches for a
placement of more, within `budget_s`, starting from greedy's answer.
"""

from __future__ import annotations

import time
from itertools import groupby

from protos.sched import InstanceSpec
from services.scheduler.cluster import DEFAULT_BUDGET_S
from services.scheduler.placement import PlacementResult, Placer, needs_gpu
from services.scheduler.solver import solve

SEARCH_MAX_INSTANCES = 2_000  # above this, greedy alone (the exact model grows with instances x nodes)
SEARCH_MAX_PAIRS = 200_000  # instance-node pairs the exact model may hold


def difficulty(spec: InstanceSpec) -> tuple:
    """Hardest first: GPU required, then most GPUs held, most GPU memory, most RAM; the id breaks ties."""
    return (not needs_gpu(spec), -spec.gpus, -spec.gpu_memory_gb, -spec.ram_gb, not spec.gpu_preferred, spec.instance_id)


def place_all(placer: Placer, instances: list[InstanceSpec], explicit: dict[str, str] | None = None, *,
              budget_s: float = DEFAULT_BUDGET_S) -> PlacementResult:
    """Place `instances` around whatever the placer already holds (running instances never move)."""
    started = time.perf_counter()
    explicit = explicit or {}
    placer.note_anti_affinity(instances)
    batch = sorted((s for s in instances if s.instance_id not in placer.where), key=difficulty)
    unplaced: dict[str, str] = {}
    _place_explicit(placer, [s for s in batch if s.instance_id in explicit], explicit, unplaced)
    rest = [s for s in batch if s.instance_id not in explicit]
    _place_greedy(placer, rest, unplaced)
    result = PlacementResult(unplaced=unplaced, optimal=not any(s.instance_id in unplaced for s in rest))
    if not result.optimal and budget_s > 0 and _small_enough(placer, rest):
        _place_exact(placer, rest, result, budget_s - (time.perf_counter() - started))
    for spec in batch:
        node = placer.where.get(spec.instance_id)
        if node is not None:
            result.placements[spec.instance_id] = placer.names[node]
    return result


def _place_greedy(placer: Placer, specs: list[InstanceSpec], unplaced: dict[str, str]) -> None:
    gangs = [s for s in specs if s.group]
    for _name, members in groupby(sorted(gangs, key=lambda s: (s.group, difficulty(s))), key=lambda s: s.group):
        _place_gang(placer, sorted(members, key=difficulty), unplaced)
    for spec in (s for s in specs if not s.group):
        node = placer.choose(spec)
        if node is None:
            unplaced[spec.instance_id] = placer.why_not(spec)
        else:
            placer.assign(spec, node)


def _small_enough(placer: Placer, specs: list[InstanceSpec]) -> bool:
    return len(specs) <= SEARCH_MAX_INSTANCES and len(specs) * len(placer.names) <= SEARCH_MAX_PAIRS


def _place_exact(placer: Placer, specs: list[InstanceSpec], result: PlacementResult, budget_s: float) -> None:
    """Replace greedy's placement of `specs` by the solver's when it places more (or as many, better)."""
    started = time.perf_counter()
    greedy = {s.instance_id: placer.where[s.instance_id] for s in specs if s.instance_id in placer.where}
    for instance_id in greedy:
        placer.unassign(instance_id)
    solved = solve(placer, specs, budget_s=budget_s, hint=greedy)
    chosen = solved.where if solved is not None and len(solved.where) >= len(greedy) else greedy
    by_id = {s.instance_id: s for s in specs}
    for instance_id, node in sorted(chosen.items(), key=lambda item: difficulty(by_id[item[0]])):
        placer.assign(by_id[instance_id], node)
    _fill_gaps(placer, [s for s in specs if s.instance_id not in chosen and not s.group])
    result.method = "cp-sat"
    result.optimal = solved is not None and solved.count_proven and len(solved.where) >= len(greedy)
    result.score_optimal = result.optimal and solved is not None and solved.score_proven and chosen is solved.where
    result.solve_ms = (time.perf_counter() - started) * 1000.0
    for spec in specs:
        result.unplaced.pop(spec.instance_id, None)
    _explain_unplaced(placer, [s for s in specs if s.instance_id not in placer.where], result.unplaced)


def _fill_gaps(placer: Placer, singles: list[InstanceSpec]) -> None:
    """A solve cut short by its budget may leave a single that still fits somewhere: greedy takes it."""
    for spec in singles:
        node = placer.choose(spec)
        if node is not None:
            placer.assign(spec, node)


def _explain_unplaced(placer: Placer, specs: list[InstanceSpec], unplaced: dict[str, str]) -> None:
    for spec in specs:
        if not spec.group:
            unplaced[spec.instance_id] = placer.why_not(spec)
            continue
        members = [s for s in specs if s.group == spec.group]
        blocked = next((m for m in members if not placer.feasible(m).any()), None)
        if blocked is not None:
            unplaced[spec.instance_id] = f"gang {spec.group!r}: {blocked.instance_id}: {placer.why_not(blocked)}"
        else:
            unplaced[spec.instance_id] = (f"gang {spec.group!r}: its {len(members)} members do not all fit at once "
                                          "beside what is placed")


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

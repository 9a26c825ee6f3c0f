"""Rebalance: a placement that places more, or scores better, by moving running instances.

Running instances may move but never drop out; pending ones are placed where they now fit. Each move
costs MOVE_COST_POINTS of score, so nothing moves for a cosmetic gain. Moves are applied one at a time
with the new copy running before the old one stops, so each must fit on its destination while the old
copy still holds its source: `order_moves` finds such an order, and a move that needs room only a later
move frees (a swap) is left out and reported as blocked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.sched import InstanceSpec, Move
from services.scheduler.batch import difficulty
from services.scheduler.cluster import NodeConfig
from services.scheduler.placement import Placer, Weights
from services.scheduler.planning import placer_for
from services.scheduler.solver import seed_points, solve


@dataclass
class RebalancePlan:
    moves: list[Move] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)  # instance id -> why its move cannot be ordered
    placed_before: int = 0
    placed_after: int = 0
    score_before: float = 0.0
    score_after: float = 0.0
    optimal: bool = False


def plan_rebalance(nodes: list[NodeConfig], movable: dict[str, tuple[InstanceSpec, str]], pending: list[InstanceSpec],
                   *, fixed: dict[str, tuple[InstanceSpec, str]] | None = None, unavailable: set[str] = frozenset(),
                   weights: Weights | None = None, budget_s: float = 2.0) -> RebalancePlan:
    """`movable` ({id: (spec, node)}) may move, `fixed` stays where it is, `pending` waits for a node."""
    base = placer_for(nodes, fixed, unavailable, weights)
    specs = sorted([spec for spec, _ in movable.values()] + pending, key=difficulty)
    base.note_anti_affinity(specs)
    current = {i: base.index[node] for i, (_, node) in movable.items() if node in base.index}
    points = {s.instance_id: seed_points(base, s) for s in specs}
    before = {i: n for i, n in current.items()}
    plan = RebalancePlan(placed_before=len(before), score_before=_score(points, before))
    solved = solve(base, specs, budget_s=budget_s, hint=current, must_place=set(current), current=current)
    if solved is None:  # nothing better found in the budget: nothing moves
        plan.placed_after, plan.score_after = plan.placed_before, plan.score_before
        return plan
    plan.optimal = solved.score_proven
    by_id = {s.instance_id: s for s in specs}
    wanted = {i: n for i, n in solved.where.items() if current.get(i) != n}
    state = placer_for(nodes, fixed, unavailable, weights)
    state.note_anti_affinity(specs)
    for instance_id, node in current.items():
        state.assign(by_id[instance_id], node)
    for instance_id, node in order_moves(state, by_id, wanted, plan.blocked):
        source = current.get(instance_id)
        plan.moves.append(Move(instance_id=instance_id, from_node=state.names[source] if source is not None else "",
                               to_node=state.names[node],
                               score_gain=round(float(points[instance_id][node]
                                                      - (points[instance_id][source] if source is not None else 0.0)), 1)))
    after = {i: n for i, n in state.where.items() if i in by_id}
    plan.placed_after, plan.score_after = len(after), _score(points, after)
    return plan


def order_moves(state: Placer, specs: dict[str, InstanceSpec], wanted: dict[str, int],
                blocked: dict[str, str]) -> list[tuple[str, int]]:
    """Moves in an order where each new copy fits beside every old one; `state` ends as they leave it.

    The old copy still holds its source while the check runs, so the new one must fit beside it (resources
    and anti-affinity). Starts of pending instances go last (moves may free their room)."""
    order: list[tuple[str, int]] = []
    left = dict(sorted(wanted.items(), key=lambda item: (item[0] not in state.where, item[0])))
    while left:
        ready = next(((i, n) for i, n in left.items() if state.feasible(specs[i])[n]), None)
        if ready is None:
            for instance_id, node in left.items():
                blocked[instance_id] = (f"{state.names[node]} has no room for a second copy until another move "
                                        f"frees it: {state.why_not(specs[instance_id], node)}")
            break
        instance_id, node = ready
        if instance_id in state.where:
            state.unassign(instance_id)
        state.assign(specs[instance_id], node)
        order.append(ready)
        del left[instance_id]
    return order


def _score(points: dict, where: dict[str, int]) -> float:
    return round(float(sum(points[i][n] for i, n in where.items())), 1)

"""One planning entry point for the scheduler service and for offline `magi place`."""

from __future__ import annotations

from protos.sched import InstanceSpec
from services.scheduler.batch import DEFAULT_BUDGET_S, place_all
from services.scheduler.cluster import NodeConfig
from services.scheduler.explain import explain as explain_unplaced
from services.scheduler.placement import PlacementResult, Placer, Weights
from shared.errors import BadRequest


def parse_explicit(text: str) -> dict[str, str]:
    """`split_brain_A:jetson,split_brain_B:rpi1` -> {instance: node} (seed 002's --placement)."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        instance, sep, node = item.partition(":")
        if not sep or not instance or not node:
            raise BadRequest(f"placement {item!r} must look like INSTANCE:NODE", field="placement")
        pairs[instance] = node
    return pairs


def plan(nodes: list[NodeConfig], instances: list[InstanceSpec], *, explicit: dict[str, str] | None = None,
         running: dict[str, tuple[InstanceSpec, str]] | None = None, unavailable: set[str] = frozenset(),
         weights: Weights | None = None, budget_s: float = DEFAULT_BUDGET_S, explain: bool = False) -> PlacementResult:
    """Place `instances` around `running` ({id: (spec, node)}, never moved) on the healthy `nodes`; with
    `explain`, say for each unplaced instance which constraint binds (`result.explanations`)."""
    ids = [s.instance_id for s in instances]
    if len(set(ids)) != len(ids):
        raise BadRequest("instance ids must be unique", field="instances")
    unknown = set(explicit or {}) - set(ids)
    if unknown:
        raise BadRequest(f"placement names instances not in the request: {', '.join(sorted(unknown))}", field="placement")
    if budget_s < 0:
        raise BadRequest("the placement budget must be 0 (greedy only) or more seconds", field="budget_s")
    placer = placer_for(nodes, running, unavailable, weights)
    result = place_all(placer, instances, explicit, budget_s=budget_s)
    if explain:
        by_id = {s.instance_id: s for s in instances}
        for instance_id in sorted(result.unplaced):
            spec = by_id[instance_id]
            gang = sum(1 for s in instances if spec.group and s.group == spec.group)
            result.explanations[instance_id] = explain_unplaced(placer, spec, gang, (explicit or {}).get(instance_id, ""))
    return result


def placer_for(nodes: list[NodeConfig], running: dict[str, tuple[InstanceSpec, str]] | None,
               unavailable: set[str] = frozenset(), weights: Weights | None = None) -> Placer:
    """A placer holding what runs; anti-affinity counts whichever side names it, a running one included."""
    placer = Placer(nodes, weights, unavailable=set(unavailable))
    held = [(spec, node) for spec, node in (running or {}).values() if node in placer.index]
    placer.note_anti_affinity([spec for spec, _ in held])
    for spec, node in held:
        placer.assign(spec, placer.index[node])
    return placer

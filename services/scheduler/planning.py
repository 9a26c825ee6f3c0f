"""One planning entry point for the scheduler service and for offline `magi place`."""

from __future__ import annotations

from protos.sched import InstanceSpec
from services.scheduler.batch import place_all
from services.scheduler.cluster import NodeConfig
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
         weights: Weights | None = None) -> PlacementResult:
    """Place `instances` around `running` ({id: (spec, node)}, never moved) on the healthy `nodes`."""
    ids = [s.instance_id for s in instances]
    if len(set(ids)) != len(ids):
        raise BadRequest("instance ids must be unique", field="instances")
    unknown = set(explicit or {}) - set(ids)
    if unknown:
        raise BadRequest(f"placement names instances not in the request: {', '.join(sorted(unknown))}", field="placement")
    placer = Placer(nodes, weights, unavailable=set(unavailable))
    for spec, node in (running or {}).values():
        if node in placer.index:
            placer.assign(spec, placer.index[node])
    return place_all(placer, instances, explicit)

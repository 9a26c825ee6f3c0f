"""Why an instance is unplaced: the binding constraint, and what each node breaks.

A node breaks one or more hard constraints for the instance, given everything placed. The binding
constraint is the one that, relaxed alone, would open the most nodes to it (the constraint it meets on
the nodes that break nothing else); when every node breaks two or more, the one most nodes break. A gang
member that some node could take alone is held back by its gang.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from protos.sched import InstanceSpec
from services.scheduler.placement import Placer, needs_gpu

# In the order `Placer.why_not` checks them.
CONSTRAINTS = ("healthy", "max_instances", "gpu", "ram", "gpu_memory", "gpus", "model_disk", "anti_affinity")
# On a tie, what is full (capacity taken by what is placed) binds before what a node simply lacks.
TIE_ORDER = ("ram", "gpu_memory", "gpus", "model_disk", "max_instances", "anti_affinity", "gpu", "healthy")


@dataclass
class Explanation:
    binding: str  # one of CONSTRAINTS, or "gang"
    summary: str
    nodes: dict[str, list[str]] = field(default_factory=dict)  # node -> the constraints it breaks, in words


def explain(placer: Placer, spec: InstanceSpec, gang_size: int = 0, explicit: str = "") -> Explanation:
    """`explicit`: the node the request pins the instance to (only that node counts)."""
    broken = _broken(placer, spec)
    nodes = {placer.names[n]: [_words(placer, spec, n, c) for c in CONSTRAINTS if broken[c][n]]
             for n in range(len(placer.names))}
    if explicit:
        reasons = nodes.get(explicit)
        if reasons is None:
            return Explanation(binding="explicit", summary=f"explicit node {explicit!r} is not in the cluster")
        first = reasons_of(broken, placer.index[explicit])
        return Explanation(binding=first[0] if first else "explicit", nodes={explicit: reasons},
                           summary=f"pinned to {explicit}: {'; '.join(reasons) or 'taken by what was placed'}")
    open_nodes = [name for name, reasons in nodes.items() if not reasons]
    if open_nodes and not spec.group:  # a solve cut short leaves none such (greedy fills the gaps)
        return Explanation(binding="budget", nodes=nodes, summary=f"fits on {', '.join(open_nodes[:3])}: "
                           "the placement's time budget ended first")
    if open_nodes:
        return Explanation(binding="gang", nodes=nodes, summary=(
            f"gang {spec.group!r}: {', '.join(open_nodes[:3])} could take it alone, but its {gang_size or 'several'} "
            "members do not all fit at once beside what is placed"))
    alone = Counter(reasons_of(broken, n)[0] for n in range(len(placer.names)) if len(reasons_of(broken, n)) == 1)
    if alone:
        binding, count = max(alone.items(), key=lambda item: (item[1], -TIE_ORDER.index(item[0])))
        summary = f"{binding}: relaxing it alone would open {count} of {len(placer.names)} nodes"
    else:
        every = Counter(c for n in range(len(placer.names)) for c in reasons_of(broken, n))
        binding, count = max(every.items(), key=lambda item: (item[1], -TIE_ORDER.index(item[0])),
                             default=("healthy", 0))
        summary = f"{binding}: broken on {count} of {len(placer.names)} nodes, each of which breaks more than one"
    return Explanation(binding=binding, summary=summary, nodes=nodes)


def reasons_of(broken: dict[str, np.ndarray], n: int) -> list[str]:
    return [c for c in CONSTRAINTS if broken[c][n]]


def _broken(placer: Placer, spec: InstanceSpec) -> dict[str, np.ndarray]:
    none = np.zeros(len(placer.names), dtype=bool)
    anti = none.copy()
    for other in placer.anti.get(spec.instance_id, ()):
        node = placer.where.get(other)
        if node is not None and other != spec.instance_id:
            anti[node] = True
    return {
        "healthy": ~placer.healthy,
        "max_instances": placer.count >= placer.max_instances,
        "gpu": ~placer.gpu if needs_gpu(spec) else none,
        "ram": placer.usable - placer.ram_alloc < spec.ram_gb - 1e-9,
        "gpu_memory": (spec.gpu_memory_gb > 0) & (~placer.gpu | (placer.gpu_total - placer.gpu_alloc
                                                                  < spec.gpu_memory_gb - 1e-9)),
        "gpus": placer.short_of_gpus(spec),
        "model_disk": placer.no_room(spec),
        "anti_affinity": anti,
    }


def _words(placer: Placer, spec: InstanceSpec, n: int, constraint: str) -> str:
    if constraint == "healthy":
        return "not healthy"
    if constraint == "max_instances":
        return f"at max_instances ({placer.max_instances[n]})"
    if constraint == "gpu":
        return "no GPU"
    if constraint == "ram":
        return f"{placer.usable[n] - placer.ram_alloc[n]:.1f} GB RAM free, needs {spec.ram_gb:g}"
    if constraint == "gpu_memory":
        free = placer.gpu_total[n] - placer.gpu_alloc[n] if placer.gpu[n] else 0.0
        return f"{free:.1f} GB GPU memory free, needs {spec.gpu_memory_gb:g}"
    if constraint == "gpus":
        return f"{placer.gpu_count[n] - placer.gpu_used[n]} of {placer.gpu_count[n]} GPUs free, needs {spec.gpus}"
    if constraint == "model_disk":
        return f"room for {placer.model_room[n]:.1f} GB of models, the model to download is {spec.download_gb:g}"
    peers = sorted(o for o in placer.anti.get(spec.instance_id, ()) if placer.where.get(o) == n)
    return f"holds {', '.join(peers)} (anti-affinity)"

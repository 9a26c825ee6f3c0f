"""`magi place` (offline planning, with --explain) and `magi rebalance` (on the bus): their output."""

from __future__ import annotations

import json

from magi.table import render
from protos.sched import RebalanceReply


def place_offline(config: str, instances: str, placement: str, *, as_json: bool, explain: bool,
                  budget_s: float | None, default_budget_s: float) -> bool:
    """Plan with the scheduler's own code and print it; True when every instance is placed. The budget:
    `budget_s` when given, else the cluster file's placement.budget_s, else `default_budget_s`."""
    from services.scheduler.cluster import load_cluster, load_instances
    from services.scheduler.planning import parse_explicit, plan

    cluster = load_cluster(config)
    budget = next(b for b in (budget_s, cluster.placement.budget_s, default_budget_s) if b is not None)
    result = plan(cluster.nodes, load_instances(instances), explicit=parse_explicit(placement),
                  weights=cluster.placement.weights, budget_s=budget, explain=explain)
    out: dict = {"placements": result.placements, "unplaced": result.unplaced}
    if explain:
        out.update(optimal=result.optimal, score_optimal=result.score_optimal, method=result.method,
                   solve_ms=round(result.solve_ms, 1),
                   explain={i: {"binding": e.binding, "summary": e.summary, "nodes": e.nodes}
                            for i, e in sorted(result.explanations.items())})
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return not result.unplaced
    rows = [[i, n] for i, n in sorted(result.placements.items())]
    rows += [[i, f"UNPLACED: {r}"] for i, r in sorted(result.unplaced.items())]
    print(render(["instance", "node"], rows))
    total = len(result.placements) + len(result.unplaced)
    proof = ("proven the most that fit" if result.optimal else "greedy alone (budget 0), not proven the most"
             if budget == 0 else f"not proven the most that fit (the {budget:g} s budget ended first)")
    print(f"\nplaced {len(result.placements)} of {total}: {proof}; {result.method}"
          + (f" in {result.solve_ms:.0f} ms" if result.method == "cp-sat" else ""))
    if explain and result.explanations:
        print()
        print(render(["unplaced", "binding constraint", "why"],
                     [[i, e.binding, e.summary] for i, e in sorted(result.explanations.items())]))
        for instance_id, e in sorted(result.explanations.items()):
            print(f"\n{instance_id}:")
            for node, reasons in e.nodes.items():
                print(f"  {node}: {'; '.join(reasons) or 'fits alone'}")
    return not result.unplaced


def print_rebalance(reply: RebalanceReply) -> None:
    rows = [[m.instance_id, m.from_node or "(pending)", m.to_node, f"{m.score_gain:+.1f}",
             "applied" if m.instance_id in reply.applied else reply.failed.get(m.instance_id, "planned")]
            for m in reply.moves]
    if rows:
        print(render(["instance", "from", "to", "score gain", "state"], rows))
    else:
        print("nothing to move: no placement places more or scores better by enough to be worth a move")
    for instance_id, reason in sorted(reply.failed.items()):
        if all(m.instance_id != instance_id for m in reply.moves):
            print(f"blocked {instance_id}: {reason}")
    done = (f"dry run: {len(reply.moves)} moves planned, nothing changed" if reply.dry_run
            else f"moved {len(reply.applied)} of {len(reply.moves)}")
    print(f"\nplaced {reply.placed_before} -> {reply.placed_after}, score {reply.score_before:g} -> "
          f"{reply.score_after:g}{' (proven best)' if reply.optimal else ''}; {done}; epoch {reply.epoch}")

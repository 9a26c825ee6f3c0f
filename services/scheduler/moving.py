"""Rebalance on the bus: plan with `services.scheduler.rebalance`, then (unless a dry run) move one instance
at a time, the new copy running before the old one stops.

A move is two placement changes. First the record names the new node and keeps the old one in
`moving_from`: both nodes' agents are assigned the instance, and the old copy's resources stay counted.
When the new node's heartbeat shows the instance running (or reserved, for a placement without a
command) at that epoch, the second change drops `moving_from` and the old agent stops its copy. A new
copy that does not come up in time (refused, crash-looping, silent) is undone instead: the instance stays
where it ran and applying stops there. Each step takes the scheduler's lock only while it changes
records, so placement and failover go on between steps; each step re-checks that its move still holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protos.sched import Move, PlacementRecord, RebalanceReply
from services.scheduler.planning import placer_for
from services.scheduler.rebalance import plan_rebalance

# services.scheduler.core.SchedulerCore, which calls in here (named, not imported: imports point one way).
SchedulerCore = Any

log = logging.getLogger("magi.scheduler.moving")

Nudge = Callable[[set[str]], Awaitable[None]]
UP = ("running", "reserved")
DOWN = ("crashloop", "refused", "failed", "exited")
MIN_WAIT_S = 5.0


async def rebalance(core: SchedulerCore, dry_run: bool, budget_s: float, nudge: Nudge) -> RebalanceReply:
    core.require_leader()
    async with core.lock:
        nodes, unavailable, _ = await core.view()
        movable = {i: (r.spec, r.node) for i, r in core.records.items()
                   if r.node and r.state == "placed" and not r.moving_from and r.node not in unavailable}
        fixed = {i: held for i, held in core.running().items() if i not in movable}
        pending = [r.spec for _, r in sorted(core.records.items()) if r.state == "pending"]
        plan = await asyncio.to_thread(plan_rebalance, nodes, movable, pending, fixed=fixed, unavailable=unavailable,
                                       weights=core.weights, budget_s=budget_s)
    reply = RebalanceReply(moves=plan.moves, placed_before=plan.placed_before, placed_after=plan.placed_after,
                           score_before=plan.score_before, score_after=plan.score_after, optimal=plan.optimal,
                           dry_run=dry_run, failed=dict(plan.blocked), epoch=core.epoch)
    if dry_run:
        return reply
    for move in plan.moves:
        error = await apply_move(core, move, nudge)
        if error:
            reply.failed[move.instance_id] = error
            break
        reply.applied.append(move.instance_id)
    log.info("rebalanced", extra={"applied": reply.applied, "failed": reply.failed, "epoch": core.epoch})
    reply.epoch = core.epoch
    return reply


async def apply_move(core: SchedulerCore, move: Move, nudge: Nudge) -> str:
    """One move, new copy first; "" when done, else why not (the instance then stays where it was)."""
    async with core.lock:
        record = core.records.get(move.instance_id)
        expected = ("", "pending") if not move.from_node else (move.from_node, "placed")
        if record is None or (record.node, record.state) != expected or record.moving_from:
            return "changed since the plan (released, moved or failed over); plan again"
        nodes, unavailable, _ = await core.view()
        placer = placer_for(nodes, core.running(), unavailable, core.weights)
        node = placer.index.get(move.to_node)
        if node is None or not placer.feasible(record.spec)[node]:
            reason = placer.why_not(record.spec, node) if node is not None else f"{move.to_node} is gone"
            return f"no longer fits: {reason}; plan again"
        epoch = await core._commit([PlacementRecord(spec=record.spec, node=move.to_node, epoch=0,
                                                    moving_from=move.from_node)])
    await nudge({move.to_node, move.from_node})
    if not move.from_node:
        return ""
    up = await wait_until_up(core, move.to_node, move.instance_id, epoch)
    async with core.lock:
        record = core.records.get(move.instance_id)
        if record is None or (record.node, record.moving_from) != (move.to_node, move.from_node):
            return "changed while moving (released or failed over)"
        keep = move.to_node if up else move.from_node
        await core._commit([PlacementRecord(spec=record.spec, node=keep, epoch=0)])
    await nudge({move.to_node, move.from_node})
    if up:
        return ""
    return f"the new copy did not come up on {move.to_node}; the instance stays on {move.from_node}"


async def wait_until_up(core: SchedulerCore, node: str, instance_id: str, epoch: int) -> bool:
    """Whether `node`'s agent reports the instance up at `epoch` or later, within ten heartbeats."""
    interval = core.registry.interval
    deadline = time.monotonic() + max(10 * interval, MIN_WAIT_S)
    while time.monotonic() < deadline:
        for state in await core.registry.nodes():
            if state.name != node:
                continue
            status = next((s for s in state.heartbeat.instances if s.instance_id == instance_id), None)
            if status is not None and status.epoch >= epoch:
                if status.state in UP:
                    return True
                if status.state in DOWN:
                    return False
        await asyncio.sleep(interval / 4)
    return False

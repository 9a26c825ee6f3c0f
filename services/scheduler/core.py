"""The scheduler's decisions: place, release, drain, fail over. One lock serialises every change.

Node capacity comes from the cluster file when one is configured (config values override for
planning), otherwise from what the node's agent reports. Failover: a node silent for 3 heartbeat
intervals (by this process's monotonic clock) loses its instances to healthy nodes; a pause shorter
than that moves nothing. Right after a restart no node is judged until a full grace period has
passed, so a restarted scheduler never re-places what is running.

Only the holder of the leader's lease changes anything or answers assignments (`self.lease`); every write
is fenced in Redis besides. A scheduler that becomes leader reloads placements first and raises the epoch
to the highest any agent reports, so the epoch never goes backwards, not even after Redis lost it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from protos.node import Heartbeat, NodeState
from protos.sched import AssignmentsReply, InstanceSpec, PlacementRecord, RebalanceReply
from services.scheduler.cluster import DEFAULT_BUDGET_S, NodeConfig
from services.scheduler.health import MISSED_BEATS, max_instances
from services.scheduler.lease import Lease, NotLeader
from services.scheduler.moving import rebalance
from services.scheduler.placement import PlacementResult, Weights
from services.scheduler.placements import PlacementStore
from services.scheduler.planning import plan
from services.scheduler.state import NodeRegistry
from shared.errors import NotFound

log = logging.getLogger("magi.scheduler.core")

# States an agent reports that placement must not try to fix by moving the instance.
STUCK = ("crashloop", "refused")

PLACEABLE = {"HEALTHY"}

# An agent's epoch report is believed only this far above ours (the agents' own rule for the scheduler's
# offers): one lying node must not push the epoch past what every other agent accepts.
MAX_EPOCH_JUMP = 1_000_000
MAX_EPOCH = 2**52


def node_from_heartbeat(hb: Heartbeat) -> NodeConfig:
    reserved = float(hb.labels.get("reserved_ram_gb", 0) or 0)
    return NodeConfig(name=hb.node, host=hb.host or "127.0.0.1", ram_gb=max(hb.ram_total_gb, 0.001),
                      gpu=bool(hb.gpus), gpu_memory_gb=sum(g.memory_total_gb for g in hb.gpus), gpu_count=len(hb.gpus),
                      cpu_cores=max(hb.cpu_count, 1), max_instances=max_instances(hb),
                      reserved_ram_gb=min(reserved, max(hb.ram_total_gb - 0.001, 0.0)),
                      models=list(hb.models), model_room_gb=hb.model_room_gb)


def with_reported(node: NodeConfig, hb: Heartbeat) -> NodeConfig:
    """A configured node's model cache is still what its agent reports, and so is its GPU count where the
    cluster file leaves it unknown (0) for a GPU node."""
    gpu_count = node.gpu_count or (len(hb.gpus) if node.gpu else 0)
    return msgspec.structs.replace(node, models=list(hb.models), model_room_gb=hb.model_room_gb, gpu_count=gpu_count)


class SchedulerCore:
    def __init__(self, registry: NodeRegistry, store: PlacementStore, lease: Lease,
                 configured: list[NodeConfig] | None = None, weights: Weights | None = None,
                 budget_s: float = DEFAULT_BUDGET_S) -> None:
        self.registry = registry
        self.budget_s = budget_s  # the exact solver's wall-clock budget per batch
        self.store = store
        self.lease = lease
        self.configured = {n.name: n for n in configured or []}
        self.weights = weights
        self.records: dict[str, PlacementRecord] = {}
        self.epoch = 0
        self.lock = asyncio.Lock()
        self.started = time.monotonic()

    async def load(self) -> None:
        self.records, self.epoch = await self.store.load()
        log.info("placements loaded", extra={"instances": len(self.records), "epoch": self.epoch})

    async def refresh(self) -> None:
        """A standby's view: what the leader last stored (its own memory may be any age)."""
        self.records, self.epoch = await self.store.load()

    def require_leader(self) -> None:
        if not self.lease.held():
            raise NotLeader("this scheduler is standing by, not the leader; retry")

    async def take_over(self) -> None:
        """Just became leader: placements as stored, the epoch never below what any agent has seen."""
        async with self.lock:
            await self.load()
            reported = [reported_epoch(st.heartbeat) for st in await self.registry.nodes()]
            await self._raise_epoch(max([e for e in reported if self._plausible(e)], default=0))
            log.info("leading", extra={"token": self.lease.token, "epoch": self.epoch,
                                       "instances": len(self.records)})

    async def repair_epoch(self, hb: Heartbeat) -> None:
        """An agent has seen a newer epoch than ours (Redis lost it, or a bug): go up to it, never down."""
        reported = reported_epoch(hb)
        if reported <= self.epoch:
            return
        if not self._plausible(reported):
            log.warning("ignored an implausible epoch report", extra={"node": hb.node, "epoch": self.epoch,
                                                                        "reported": reported})
            return
        async with self.lock:
            await self._raise_epoch(reported, hb.node)

    def _plausible(self, reported: int) -> bool:
        return reported < MAX_EPOCH and (self.epoch == 0 or reported - self.epoch <= MAX_EPOCH_JUMP)

    async def _raise_epoch(self, floor: int, node: str = "") -> None:
        if floor <= self.epoch:
            return
        before, self.epoch = self.epoch, await self.store.raise_epoch(floor, self.lease.value)
        log.warning("epoch raised to what agents report", extra={"from": before, "to": self.epoch,
                                                                 "node": node or "all"})

    # ---- views -------------------------------------------------------------------------------------

    async def view(self) -> tuple[list[NodeConfig], set[str], list[NodeState]]:
        states = await self.registry.nodes()
        nodes = dict(self.configured)
        for st in states:
            nodes.setdefault(st.name, node_from_heartbeat(st.heartbeat))
            nodes[st.name] = with_reported(nodes[st.name], st.heartbeat)
        status = {st.name: st.status for st in states}
        unavailable = {name for name in nodes if status.get(name, "UNAVAILABLE") not in PLACEABLE}
        return list(nodes.values()), unavailable, states

    def running(self, exclude: set[str] = frozenset()) -> dict[str, tuple[InstanceSpec, str]]:
        held = {i: (r.spec, r.node) for i, r in self.records.items() if r.node and i not in exclude}
        # A move in progress: the old copy still runs, and holds its node's resources, until the new one runs.
        held.update({f"{i}~moving": (msgspec.structs.replace(r.spec, instance_id=f"{i}~moving"), r.moving_from)
                     for i, r in self.records.items() if r.moving_from and i not in exclude})
        return held

    def assignments(self, node: str) -> AssignmentsReply:
        self.require_leader()  # a standby's memory may be stale: an agent must never act on it
        specs = [r.spec for _, r in sorted(self.records.items()) if node in (r.node, r.moving_from)]
        return AssignmentsReply(node=node, epoch=self.epoch, instances=specs)

    # ---- changes -----------------------------------------------------------------------------------

    async def _commit(self, changed: list[PlacementRecord], deleted: list[str] = ()) -> int:
        self.require_leader()
        for _ in range(3):
            epoch = self.epoch + 1
            for record in changed:
                record.epoch = epoch
            stored = await self.store.commit(changed, list(deleted), epoch, self.lease.value)
            if not stored:
                break
            self.epoch = stored  # Redis is ahead of us: stamp above it
        else:
            raise NotLeader("the placement epoch keeps moving under this scheduler; retry")
        for record in changed:
            self.records[record.spec.instance_id] = record
        for instance_id in deleted:
            self.records.pop(instance_id, None)
        self.epoch = epoch
        return epoch

    async def place(self, specs: list[InstanceSpec], explicit: dict[str, str]) -> tuple[PlacementResult, int, set[str]]:
        """New instances are placed; ids already placed keep their node (nothing running moves)."""
        self.require_leader()
        async with self.lock:
            known = {s.instance_id: self.records[s.instance_id].node for s in specs if s.instance_id in self.records}
            fresh = [s for s in specs if s.instance_id not in known]
            nodes, unavailable, _ = await self.view()
            # CPU-bound for up to the budget (the solver): off the event loop, so heartbeats keep flowing.
            result = await asyncio.to_thread(plan, nodes, fresh, explicit={k: v for k, v in explicit.items() if k not in known},
                                             running=self.running(), unavailable=unavailable, weights=self.weights,
                                             budget_s=self.budget_s)
            by_id = {s.instance_id: s for s in fresh}
            changed = [PlacementRecord(spec=by_id[i], node=n, epoch=0) for i, n in result.placements.items()]
            epoch = await self._commit(changed) if changed else self.epoch
            result.placements.update({i: n for i, n in known.items() if n})
            return result, epoch, {n for n in result.placements.values()}

    async def release(self, instance_ids: list[str]) -> tuple[list[str], list[str], int, set[str]]:
        async with self.lock:
            found = [i for i in instance_ids if i in self.records]
            nodes = {self.records[i].node for i in found}
            epoch = await self._commit([], found) if found else self.epoch
            return found, [i for i in instance_ids if i not in found], epoch, nodes

    async def drain(self, node: str, on: bool) -> tuple[PlacementResult, int, set[str]]:
        self.require_leader()
        nodes, _, _ = await self.view()
        if node not in {n.name for n in nodes}:
            raise NotFound(f"unknown node {node!r}", field="node")
        await self.registry.set_maintenance(node, on)
        if not on:
            return PlacementResult(), self.epoch, set()
        return await self.evacuate({node})

    async def evacuate(self, dead: set[str]) -> tuple[PlacementResult, int, set[str]]:
        """Re-place what runs on `dead` nodes (and what is pending); crash-looping instances stay put."""
        async with self.lock:
            back = [PlacementRecord(spec=r.spec, node=r.moving_from, epoch=0) for r in self.records.values()
                    if r.moving_from and r.node in dead and r.moving_from not in dead]
            if back:  # a move's new node died: its old copy still runs where it was, so it stays there
                await self._commit(back)
            victims = [r for r in self.records.values()
                       if (r.node in dead or r.state == "pending") and r.state not in STUCK]
            if not victims:
                return PlacementResult(), self.epoch, set()
            nodes, unavailable, _ = await self.view()
            moving = {r.spec.instance_id for r in victims}
            result = await asyncio.to_thread(plan, nodes, [r.spec for r in victims],
                                             running=self.running(exclude=moving), unavailable=unavailable | dead,
                                             weights=self.weights, budget_s=self.budget_s)
            changed = [PlacementRecord(spec=r.spec, node=result.placements.get(r.spec.instance_id, ""), epoch=0,
                                       state="placed" if r.spec.instance_id in result.placements else "pending",
                                       reason=result.unplaced.get(r.spec.instance_id, ""))
                       for r in victims]
            changed = [c for c in changed if (c.node, c.state, c.reason) != _key(self.records[c.spec.instance_id])]
            if not changed:
                return result, self.epoch, set()
            touched = {c.node for c in changed} | {self.records[c.spec.instance_id].node for c in changed}
            epoch = await self._commit(changed)
            log.info("failover", extra={"moved": result.placements, "pending": sorted(result.unplaced), "epoch": epoch})
            return result, epoch, touched - {""}

    async def rebalance(self, dry_run: bool, budget_s: float, nudge) -> RebalanceReply:
        """A placement that places more or scores better by moving running instances (services.scheduler.moving)."""
        return await rebalance(self, dry_run, budget_s, nudge)

    async def dead_nodes(self, interval: float) -> set[str]:
        """Nodes to evacuate: silent past the grace period, or in maintenance."""
        grace = MISSED_BEATS * interval
        if time.monotonic() - self.started <= grace:
            return set()  # just restarted: give every agent a chance to be heard first
        states = await self.registry.nodes()
        return {st.name for st in states if st.status in ("UNAVAILABLE", "MAINTENANCE")}

    async def note_instance_states(self, hb: Heartbeat) -> None:
        """Mark instances the agent reports as crash-looping or refused, so failover leaves them alone."""
        changed = []
        for status in hb.instances:
            record = self.records.get(status.instance_id)
            if status.state not in STUCK or record is None or record.node != hb.node or record.state == status.state:
                continue
            reason = (f"crash-looping on {hb.node}" if status.state == "crashloop"
                      else f"refused by {hb.node}'s agent: {status.reason}")
            changed.append(PlacementRecord(spec=record.spec, node=record.node, epoch=0, state=status.state,
                                           reason=reason, moving_from=record.moving_from))
        if changed:
            async with self.lock:
                await self._commit(changed)
            log.warning("instances stuck", extra={"node": hb.node, "instances": {c.spec.instance_id: c.reason
                                                                               for c in changed}})


async def report(core: "SchedulerCore"):
    """The seed-002 report: instances and RAM as *allocated by placement*, capacity from the plan."""
    from services.scheduler.health import build_report

    nodes, _, states = await core.view()
    status = {st.name: st for st in states}
    allocated: dict[str, tuple[int, float]] = {}
    for record in core.records.values():
        count, ram = allocated.get(record.node, (0, 0.0))
        allocated[record.node] = (count + 1, ram + record.spec.ram_gb)
    warnings = [f"instance {r.spec.instance_id} is crash-looping on {r.node}" for r in core.records.values()
                if r.state == "crashloop"]
    warnings += [f"instance {r.spec.instance_id} was {r.reason}" for r in core.records.values() if r.state == "refused"]
    warnings += [f"instance {r.spec.instance_id} is pending: {r.reason}" for r in core.records.values()
                 if r.state == "pending"]
    return build_report(sorted(nodes, key=lambda n: n.name), status, allocated, warnings)


def reported_epoch(hb: Heartbeat) -> int:
    """The newest epoch a heartbeat shows: the agent's own, or any of its instances'."""
    return max([hb.epoch, *(i.epoch for i in hb.instances)])


def _key(record: PlacementRecord) -> tuple[str, str, str]:
    return record.node, record.state, record.reason

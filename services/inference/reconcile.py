"""Applying the catalogue bucket (livecatalog.py) to the running replicas without a restart.

Level-triggered: each change of a model's key records what is wanted and wakes that model's worker, which
compares the model as it runs with the model as wanted (`plan`) and converges: a new model gets a pool and
replicas; a removed one stops taking requests, drains, then stops; a changed replica count adds or drains
replicas; a changed setting a replica is built from (source, n_ctx, threads, node, max_batch, ...) replaces
the replicas one at a time, each new one ready before an old one drains, so the model keeps serving; other
settings (roles, max_queue, warm-up timeout, autoscale) apply in place. One worker per model, so a slow
drain of one model never holds up another; a change that arrives while its worker runs makes it look again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from protos.sched import ReleaseReply, ReleaseRequest
from services.inference.catalog import Catalog, ModelSpec
from services.inference.pool import ModelPool, Replica
from services.inference.replicas import PLACE_TIMEOUT_S, replica_specs
from services.inference.router import Release, Router
from shared import bus

log = logging.getLogger("magi.inference.reconcile")

# Settings the running replicas do not depend on: changed in place. Every other field (including any added
# later) is built into a replica's actor, so a change replaces the replicas: the safe default.
IN_PLACE = frozenset({"roles", "replicas", "warmup_timeout_s", "max_queue", "autoscale"})
DRAIN_TIMEOUT_S = 60.0  # how long removed replicas may finish what they serve before they are stopped
RESYNC_S = 30.0  # how often models that still differ from the catalogue are looked at again


@dataclass(frozen=True)
class Plan:
    """What one model needs to match the catalogue."""

    add: bool = False  # new: a pool and `replicas` replicas
    remove: bool = False  # gone from the catalogue: drain, then stop
    reload: tuple[str, ...] = ()  # settings that need fresh replicas (replaced one at a time)
    in_place: tuple[str, ...] = ()  # settings applied to the running pool
    replicas: int = 0  # replicas wanted afterwards

    @property
    def noop(self) -> bool:
        return not (self.add or self.remove or self.reload or self.in_place)


def changed_fields(old: ModelSpec, new: ModelSpec) -> list[str]:
    return [f for f in old.__struct_fields__ if getattr(old, f) != getattr(new, f)]


def plan(running: ModelSpec | None, wanted: ModelSpec | None) -> Plan:
    """The step from the model as it runs to the model as the catalogue holds it (None: absent)."""
    if wanted is None:
        return Plan(remove=running is not None)
    if running is None:
        return Plan(add=True, replicas=wanted.replicas)
    fields = changed_fields(running, wanted)
    reload = [f for f in fields if f not in IN_PLACE]
    if running.embedding != wanted.embedding:  # roles decide whether the actor loads an embedding model
        reload.append("roles")
    return Plan(reload=tuple(reload), in_place=tuple(f for f in fields if f in IN_PLACE and f not in reload),
                replicas=wanted.replicas)


def diff(running: dict[str, ModelSpec], wanted: dict[str, ModelSpec]) -> dict[str, Plan]:
    """Every model whose running state differs from the catalogue, with its plan."""
    plans = {name: plan(running.get(name), wanted.get(name)) for name in {*running, *wanted}}
    return {name: p for name, p in sorted(plans.items()) if not p.noop}


def removal_order(replicas: list[Replica]) -> list[Replica]:
    """Which replicas go first on a scale-down: those not serving (failed, restarting, starting) before ready
    ones, then the least busy, then the highest index (so ids stay 0..n-1)."""
    rank = {"failed": 0, "restarting": 1, "starting": 2, "ready": 3}
    return sorted(replicas, key=lambda r: (rank.get(r.state, 0), r.in_flight, -r.index))


def scheduler_release(nc) -> Release:
    """Tell the scheduler removed replicas (and their shards) no longer hold their placements."""
    async def release(pool: ModelPool, replicas: list[Replica]) -> None:
        ids = [spec.instance_id for r in replicas for spec in replica_specs(pool, r.replica_id)]
        reply = await bus.request(nc, "magi.sched.release", ReleaseRequest(instance_ids=ids), ReleaseReply,
                                  timeout=PLACE_TIMEOUT_S)
        log.info("replica placements released", extra={"released": reply.released, "unknown": reply.unknown})

    return release


class Reconciler:
    def __init__(self, router: Router, *, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        self.router = router
        self.drain_timeout_s = drain_timeout_s
        self.wanted: dict[str, ModelSpec] = {name: pool.spec for name, pool in router.pools.items()}
        self._workers: dict[str, asyncio.Task] = {}
        self._again: set[str] = set()

    def want(self, name: str, spec: ModelSpec | None) -> None:
        """The catalogue now holds `spec` for `name` (None: removed); converge in the background."""
        if spec is None:
            self.wanted.pop(name, None)
        else:
            self.wanted[name] = spec
        # Default threads split the cores over every generation replica in the catalogue.
        self.router.catalog = Catalog(models=list(self.wanted.values()))
        self._kick(name)

    def resync(self) -> list[str]:
        """Converge again every model that differs from the catalogue: a change that failed (weights not
        there yet, no node to place on) is retried without waiting for the next edit. The models looked at."""
        running = {name: pool.spec for name, pool in self.router.pools.items()}
        names = set(diff(running, self.wanted))
        names |= {name for name, pool in self.router.pools.items()
                  if len(self._serving(pool)) != pool.spec.replicas
                  or any(r.revision != pool.revision for r in self._serving(pool))}
        for name in sorted(names):
            self._kick(name)
        return sorted(names)

    async def resync_forever(self, interval_s: float = RESYNC_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.resync()

    def _kick(self, name: str) -> None:
        worker = self._workers.get(name)
        if worker is not None and not worker.done():
            self._again.add(name)
            return
        self._workers[name] = asyncio.create_task(self._converge(name), name=f"reconcile:{name}")

    async def follow(self, changes) -> None:
        """Apply every (name, spec) the catalogue watch yields, for as long as it yields."""
        async for name, spec in changes:
            self.want(name, spec)

    async def settled(self) -> None:
        """Wait until no model's worker runs (tests and benchmarks)."""
        while any(not w.done() for w in self._workers.values()):
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def _converge(self, name: str) -> None:
        while True:
            self._again.discard(name)
            try:
                await self.apply(name)
            except Exception:
                log.exception("model change not applied", extra={"model": name})
            if name not in self._again:
                return

    async def apply(self, name: str) -> None:
        pool = self.router.pools.get(name)
        wanted = self.wanted.get(name)
        step = plan(pool.spec if pool else None, wanted)
        if step.remove:
            log.info("model removed from the catalogue; draining", extra={"model": name})
            await self.router.remove_model(name, drain_timeout_s=self.drain_timeout_s)
        elif step.add:
            log.info("model added to the catalogue", extra={"model": name, "replicas": step.replicas})
            await self.router.add_model(wanted)
        elif pool is not None and wanted is not None:
            if step.reload:
                log.info("model settings changed; replacing replicas", extra={"model": name, "fields": step.reload})
                await self.router.reload(pool, wanted)
            elif step.in_place:
                log.info("model settings changed in place", extra={"model": name, "fields": step.in_place})
                pool.spec = wanted
                await pool.notify()
            await self._replace_stale(pool)
            await self._scale(pool, wanted.replicas)

    def _serving(self, pool: ModelPool) -> list[Replica]:
        return [r for r in pool.replicas if r.state != "draining"]

    async def _replace_stale(self, pool: ModelPool) -> None:
        """Replicas built from older settings, replaced one at a time: the new one ready first, then the old
        one drains. A new one that does not start stops the roll (the older ones keep serving)."""
        while stale := [r for r in removal_order(self._serving(pool)) if r.revision != pool.revision]:
            current = [r for r in self._serving(pool) if r.revision == pool.revision]
            if len(current) < pool.spec.replicas:
                fresh = await self.router.add_replica(pool)
                if fresh.state != "ready":
                    log.error("replacement replica did not start; older replicas keep serving",
                              extra={"model": pool.spec.name, "replica": fresh.replica_id})
                    await self.router.remove_replica(pool, fresh, drain_timeout_s=0)
                    return
            await self.router.remove_replica(pool, stale[0], drain_timeout_s=self.drain_timeout_s)

    async def _scale(self, pool: ModelPool, wanted: int) -> None:
        serving = self._serving(pool)
        if len(serving) < wanted:
            log.info("scaling up", extra={"model": pool.spec.name, "from": len(serving), "to": wanted})
            await asyncio.gather(*(self.router.add_replica(pool) for _ in range(wanted - len(serving))))
        elif len(serving) > wanted:
            log.info("scaling down", extra={"model": pool.spec.name, "from": len(serving), "to": wanted})
            victims = removal_order(serving)[:len(serving) - wanted]
            await asyncio.gather(*(self.router.remove_replica(pool, r, drain_timeout_s=self.drain_timeout_s)
                                   for r in victims))

    async def close(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

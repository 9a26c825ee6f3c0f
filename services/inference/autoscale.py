"""The autoscaler: a model whose catalogue entry has `autoscale` gets its replica count raised or lowered by
queue depth, written into the catalogue bucket so the change goes through the reconciler like an operator's
`magi models scale` (and shows in `magi models`).

Why queue depth per slot: a request waiting means every slot is busy; more waiting per slot than the target
means the model is short of replicas for longer than one request takes. Scaling down waits until nothing
waits and the requests in flight would leave the remaining replicas half free, so a steady load does not
flap between n and n-1; the cool-down spaces changes by at least a replica's load time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from services.inference.catalog import Autoscale
from services.inference.pool import ModelPool
from services.inference.router import Router

log = logging.getLogger("magi.inference.autoscale")

INTERVAL_S = 2.0  # between looks at the pools
SCALE_DOWN_FILL = 0.5  # scale down only when the others' slots would be at most this full

Write = Callable[[str, int], Awaitable[None]]  # (model, replicas): the catalogue's count set to that


@dataclass(frozen=True)
class Load:
    replicas: int  # the catalogue's count
    ready: int  # replicas serving now
    slots: int  # requests one replica serves at once (max_batch)
    queued: int  # requests waiting for a slot
    in_flight: int  # requests on a replica


def decide(policy: Autoscale, load: Load, since_change_s: float) -> int:
    """The replica count to set (the current one: no change)."""
    bounded = min(policy.max_replicas, max(policy.min_replicas, load.replicas))
    if bounded != load.replicas:
        return bounded  # outside the bounds (they were just changed): back within them at once
    if since_change_s < policy.cooldown_s:
        return load.replicas
    if load.ready < load.replicas:
        return load.replicas  # a change still under way (or a replica down): judge once it has settled
    if load.queued / max(1, load.ready * load.slots) > policy.target_queue_per_slot:
        return min(policy.max_replicas, load.replicas + 1)
    others = (load.replicas - 1) * load.slots
    if load.queued == 0 and load.replicas > policy.min_replicas and load.in_flight <= others * SCALE_DOWN_FILL:
        return load.replicas - 1
    return load.replicas


def load_of(pool: ModelPool) -> Load:
    return Load(replicas=pool.spec.replicas, ready=sum(1 for r in pool.replicas if r.state == "ready"),
                slots=pool.spec.max_batch, queued=pool.queued, in_flight=sum(r.in_flight for r in pool.replicas))


class Autoscaler:
    def __init__(self, router: Router, write: Write, *, interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.router = router
        self.write = write
        self.interval_s = interval_s
        self.clock = clock
        self._changed_at: dict[str, float] = {}  # the last change this autoscaler made per model

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("autoscaler round failed")

    async def tick(self) -> None:
        now = self.clock()
        for name, pool in list(self.router.pools.items()):
            policy = pool.spec.autoscale
            if policy is None:
                continue
            load = load_of(pool)
            # Never changed by this service yet: count from its start, so a restart does not scale at once.
            since = now - self._changed_at.setdefault(name, now)
            target = decide(policy, load, since)
            if target != load.replicas:
                log.info("autoscaling", extra={"model": name, "from": load.replicas, "to": target,
                                               "queued": load.queued, "in_flight": load.in_flight})
                await self.write(name, target)
                self._changed_at[name] = now

"""The periodic replica check: is every ready replica alive, is it still where the scheduler places
it, and may a given-up replica try again?

Why poll: the inference service may not subscribe to `magi.node.>` (the scheduler's nudges go to
agents) nor read `magi.sched.assignments.>`; it may ask `magi.sched.place`, which for instance ids
already placed only answers their current node (nothing moves because of the question). So one
place request per round lists every ready replica; a node drained or judged dead shows up as a
changed answer, and the keeper moves the replica there. An idle replica that died is found by a
ping in the actor's control group (it answers even mid-generation), so it does not wait for the next
request to fail before it is restarted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Iterable

from services.inference.keeper import Keeper, actor_died
from services.inference.pool import ModelPool, Replica

log = logging.getLogger("magi.inference.follow")

FOLLOW_INTERVAL_S = 5.0
PING_TIMEOUT_S = 10.0  # a replica on a node that vanished answers only once Ray declares the node dead

# (pool, replica) pairs -> replica id -> nodes as now placed (the replica's, then its shards'); None when
# no scheduler answers.
Where = Callable[[list[tuple[ModelPool, Replica]]], Awaitable[dict[str, list[str]] | None]]


class Follower:
    def __init__(self, pools: Iterable[ModelPool], keeper: Keeper, where: Where | None, *,
                 interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self.pools = pools  # a live view (the router's dict values): models come and go at run time
        self.keeper = keeper
        self.where = where
        self.interval_s = interval_s

    def _ready(self) -> list[tuple[ModelPool, Replica]]:
        return [(p, r) for p in self.pools for r in p.replicas if r.state == "ready" and not self.keeper.busy(r)]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("replica check failed")

    async def check(self) -> None:
        await self.ping()
        await self.follow()
        self.revive()

    async def ping(self) -> None:
        ready = [(p, r, r.actor) for p, r in self._ready()]  # the actor pinged, should it be replaced meanwhile
        answers = await asyncio.gather(*(_ping(actor) for _, _, actor in ready), return_exceptions=True)
        for (pool, replica, actor), answer in zip(ready, answers):
            if isinstance(answer, BaseException) and actor_died(answer):
                self.keeper.lost(pool, replica, actor)

    async def follow(self) -> None:
        ready = [(p, r) for p, r in self._ready() if r.placed]
        if self.where is None or not ready:
            return
        placed = await self.where(ready)
        for pool, replica in ready if placed else []:
            nodes = placed.get(replica.replica_id) or []
            if moved(replica, nodes) and not replica.budget.exhausted():
                self.keeper.move(pool, replica, nodes)

    def revive(self) -> None:
        for pool in self.pools:
            for replica in pool.replicas:
                if replica.state == "failed" and replica.budget.refilled():
                    self.keeper.revive(pool, replica)


def moved(replica: Replica, nodes: list[str]) -> bool:
    """The scheduler now places the replica (or one of its shards) on another node. An instance it
    could not place anywhere (empty node) is left where it is: moving it would only stop it."""
    return len(nodes) == len(replica.placed) and all(nodes) and nodes != replica.placed


async def _ping(actor) -> object:
    return await asyncio.wait_for(_result(actor.ping.remote()), PING_TIMEOUT_S)


async def _result(ref):
    return await ref

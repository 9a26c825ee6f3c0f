"""Keeping replicas alive: warming them within a deadline, starting them again when they die, and
moving live ones when the scheduler places them elsewhere.

The inference service owns every restart (replica actors run with Ray's `max_restarts=0`): Ray would
restart an actor only on the node it is pinned to, which never helps when that node is gone. A
restart asks the factory for a fresh actor and the factory asks the scheduler, so a replica follows
its node. Restarts spend the replica's budget (budget.py); one spent is `failed`. At most one
lifecycle task (recovery or move) runs per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable, Coroutine

from services.inference import tp_groups
from services.inference.pool import ModelPool, Replica

log = logging.getLogger("magi.inference.keeper")

Make = Callable[[ModelPool, int], Awaitable[Replica]]
RETRY_PAUSE_S = 1.0  # between failed starts, so a broken replica cannot spin the CPU


def actor_died(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def kill_actor(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):  # already gone is fine
        ray.kill(actor, no_restart=True)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


async def _result(ref: Any) -> Any:
    return await ref  # a Ray ObjectRef (or any awaitable) as a coroutine, so wait_for can bound it


class Keeper:
    def __init__(self, make: Make, *, kill: Callable[[Any], None] = kill_actor,
                 retry_pause_s: float = RETRY_PAUSE_S) -> None:
        self.make = make
        self.kill = kill
        self.retry_pause_s = retry_pause_s
        self._tasks: dict[str, asyncio.Task] = {}

    # ---- warming -----------------------------------------------------------------------------------

    async def warm(self, pool: ModelPool, replica: Replica) -> bool:
        """Ready means a real one-token generation (or embedding) went through within the warm-up
        deadline; a replica that hangs while loading is killed rather than waited on for ever."""
        timeout = pool.spec.warmup_timeout_s
        try:
            meta = await asyncio.wait_for(_result(replica.actor.warmup.remote()), timeout)
        except TimeoutError:
            log.warning("replica warm-up timed out; killed",
                        extra={"replica": replica.replica_id, "node": replica.node, "timeout_s": timeout})
            self.retire(replica)
            return False
        except Exception as exc:
            log.warning("replica failed to warm up",
                        extra={"replica": replica.replica_id, "node": replica.node, "error": _error(exc)})
            return False
        replica.mark_ready(meta)
        log.info("replica ready", extra={"replica": replica.replica_id, "node": replica.node, "pid": replica.pid})
        await pool.notify()
        return True

    def retire(self, replica: Replica) -> None:
        for actor in [replica.actor, *replica.shard_actors]:
            if actor is not None:
                self.kill(actor)
        tp_groups.release(replica.actor)  # a tensor-parallel replica's placement group, if it spans nodes

    # ---- replicas added and removed at run time ----------------------------------------------------

    async def start(self, pool: ModelPool, replica: Replica) -> bool:
        """A replica added while the service runs (scaled up, a new model, a rolling replacement): an actor
        wherever the scheduler places it now, warmed. True once ready; one that fails is retried in the
        background on its restart budget, as a restart would be."""
        if await self._restart(pool, replica):
            return True
        if replica.state != "draining":  # not being removed meanwhile
            replica.state = "restarting"
            self._run(replica, self._recover(pool, replica, failed=True))
        return False

    async def forget(self, replica: Replica) -> None:
        """Stop whatever restart or move runs for a replica being removed, and wait until it has wound down
        (a cancelled move clears the replica's `draining` flag on its way out)."""
        task = self._tasks.pop(replica.replica_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _make(self, pool: ModelPool, index: int) -> Replica:
        fresh = await self.make(pool, index)
        fresh.revision = pool.revision  # built from the pool's settings as they are now
        return fresh

    # ---- failures ----------------------------------------------------------------------------------

    def busy(self, replica: Replica) -> bool:
        task = self._tasks.get(replica.replica_id)
        return task is not None and not task.done()

    def lost(self, pool: ModelPool, replica: Replica, actor: Any = None) -> None:
        """The replica's process (or its node) died: start it again in the background. `actor` is the
        one that was seen dying; news about an actor already replaced is ignored."""
        if (actor is not None and actor is not replica.actor) or replica.state not in ("ready", "starting"):
            return
        self._cancel(replica)  # a move in progress is moot now
        replica.state, replica.pid = "restarting", 0
        log.warning("replica died", extra={"replica": replica.replica_id, "node": replica.node,
                                           "restarts": replica.restarts})
        self._run(replica, self._recover(pool, replica, failed=True))

    def revive(self, pool: ModelPool, replica: Replica) -> None:
        """Try a given-up replica again (its budget refilled after a stable stretch)."""
        if replica.state != "failed" or self.busy(replica):
            return
        replica.state = "restarting"
        log.info("replica tried again", extra={"replica": replica.replica_id, "restarts": replica.restarts})
        self._run(replica, self._recover(pool, replica, failed=False))

    async def _recover(self, pool: ModelPool, replica: Replica, *, failed: bool) -> None:
        if failed and not self._charge(replica):
            return await self._give_up(pool, replica)
        while not await self._restart(pool, replica):
            if not self._charge(replica):
                return await self._give_up(pool, replica)
            await asyncio.sleep(self.retry_pause_s)

    def _charge(self, replica: Replica) -> bool:
        replica.restarts += 1
        return replica.budget.spend()

    async def _restart(self, pool: ModelPool, replica: Replica) -> bool:
        """A fresh actor (and shards) wherever the scheduler now places the replica, warmed."""
        self.retire(replica)
        replica.state, replica.pid = "restarting", 0
        try:
            fresh = await self._make(pool, replica.index)
        except Exception as exc:
            log.warning("replica could not be started", extra={"replica": replica.replica_id, "error": _error(exc)})
            return False
        if replica.node and fresh.node != replica.node:
            log.info("replica follows its node", extra={"replica": replica.replica_id, "from": replica.node,
                                                        "to": fresh.node})
        _adopt(replica, fresh)
        return await self.warm(pool, replica)

    async def _give_up(self, pool: ModelPool, replica: Replica) -> None:
        self.retire(replica)
        replica.state, replica.pid = "failed", 0
        log.error("replica given up", extra={"replica": replica.replica_id, "restarts": replica.restarts,
                                             "retry_after_s": replica.budget.stable_s})
        await pool.notify()

    # ---- moves -------------------------------------------------------------------------------------

    def move(self, pool: ModelPool, replica: Replica, nodes: list[str]) -> None:
        """The scheduler placed a live replica elsewhere (its node drained or judged dead)."""
        if replica.state != "ready" or self.busy(replica):
            return
        log.info("replica placement changed", extra={"replica": replica.replica_id, "from": replica.placed,
                                                      "to": nodes})
        self._run(replica, self._move(pool, replica))

    async def _move(self, pool: ModelPool, replica: Replica) -> None:
        """Make before break: the fresh replica warms while the old one serves, takes over once the old
        one is idle, and the old actor is retired. A failed move leaves the old one serving."""
        fresh: Replica | None = None
        try:
            fresh = await self._make(pool, replica.index)
            if not await self.warm(pool, fresh):
                replica.budget.spend()  # a failed start all the same: the follower backs off
                return
            old = await self._swap_when_idle(pool, replica, fresh)
            fresh = None
            self.retire(old)
            log.info("replica moved", extra={"replica": replica.replica_id, "from": old.node, "to": replica.node})
        except Exception as exc:
            log.warning("replica could not move", extra={"replica": replica.replica_id, "error": _error(exc)})
        finally:
            if fresh is not None:
                self.retire(fresh)

    async def _swap_when_idle(self, pool: ModelPool, replica: Replica, fresh: Replica) -> Replica:
        replica.draining = True
        try:
            async with pool.changed:
                await pool.changed.wait_for(lambda: replica.in_flight == 0)
                old = Replica(replica_id=replica.replica_id, actor=replica.actor, node=replica.node,
                              shard_actors=replica.shard_actors)
                _adopt(replica, fresh)
                pool.changed.notify_all()
                return old
        finally:
            replica.draining = False

    # ---- tasks -------------------------------------------------------------------------------------

    def _run(self, replica: Replica, work: Coroutine) -> None:
        task = asyncio.create_task(work, name=f"keep:{replica.replica_id}")
        self._tasks[replica.replica_id] = task
        task.add_done_callback(lambda t: self._tasks.pop(replica.replica_id, None) if
                               self._tasks.get(replica.replica_id) is t else None)

    def _cancel(self, replica: Replica) -> None:
        task = self._tasks.pop(replica.replica_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _adopt(replica: Replica, fresh: Replica) -> None:
    replica.actor, replica.shards, replica.shard_actors = fresh.actor, fresh.shards, fresh.shard_actors
    replica.revision, replica.digest = fresh.revision, fresh.digest
    replica.placed, replica.node, replica.pid, replica.state = fresh.placed, fresh.node, fresh.pid, fresh.state

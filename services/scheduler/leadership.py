"""Win, keep and lose the leader's lease; start and stop the leader's duties with it.

Every scheduler runs this loop every third of the lease: a standby tries to take the lease, the leader
renews it. The duties (answering writes and assignments, failover) run exactly while this process holds
the lease; losing it, or failing to renew it before it runs out, stops them at once. One log line per
change of office, not per round.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import redis.asyncio as redis

from services.scheduler.lease import Lease

log = logging.getLogger("magi.scheduler.leadership")

Duty = Callable[[], Awaitable[None]]


class Leadership:
    def __init__(self, lease: Lease, start: Duty, stop: Duty, renew_s: float) -> None:
        self.lease = lease
        self._start = start
        self._stop = stop
        self.renew_s = renew_s
        self.leading = False  # the duties are running
        self._redis_down = False

    async def step(self) -> None:
        """One round: renew or take the lease, and make the duties match."""
        try:
            if self.lease.value:
                if not await self.lease.renew():
                    await self.step_down("the lease is another scheduler's now")
            elif await self.lease.acquire():
                await self._take_office()
            self._note_redis(None)
        except (redis.RedisError, OSError) as exc:
            self._note_redis(exc)
        if self.leading and not self.lease.held():
            await self.step_down("the lease ran out before it could be renewed")

    async def _take_office(self) -> None:
        try:
            await self._start()
        except Exception as exc:  # Redis, NATS or anything else: holding the lease without the duties helps no one
            log.warning("could not take office; standing by", extra={"error": f"{type(exc).__name__}: {exc}"})
            await self._stop()
            await self.lease.release()
            return
        self.leading = True
        log.info("became the scheduler leader", extra={"holder": self.lease.holder, "token": self.lease.token})

    async def step_down(self, why: str) -> None:
        was = self.leading
        self.leading = False
        self.lease.drop()
        if was:
            log.warning("no longer the scheduler leader", extra={"holder": self.lease.holder, "why": why})
        await self._stop()

    def _note_redis(self, exc: BaseException | None) -> None:
        if exc is not None and not self._redis_down:
            log.warning("cannot reach Redis for the leader's lease", extra={"error": f"{type(exc).__name__}: {exc}"})
        elif exc is None and self._redis_down:
            log.info("Redis reachable again for the leader's lease")
        self._redis_down = exc is not None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            try:
                await self.step()
            except Exception:  # one bad round must not end the election
                log.exception("leader election round failed")

    async def resign(self) -> None:
        """On shutdown: stop the duties and free the lease, so a standby takes over without waiting it out."""
        was, self.leading = self.leading, False
        await self._stop()
        try:
            await self.lease.release()
        except (redis.RedisError, OSError):
            self.lease.drop()  # it runs out by itself
        if was:
            log.info("resigned as the scheduler leader", extra={"holder": self.lease.holder})

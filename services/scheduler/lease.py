"""The scheduler leader's lease in Redis: one scheduler in charge, the others standing by.

The lease is one key, `magi:sched:leader`, holding `<token>:<holder>` with a TTL (SET NX PX). The token
comes from INCR on `magi:sched:leader:token`, so every term of office has a larger one than the last:
a fencing token. The holder renews by compare-and-set (a Lua script): a holder that was paused past its
TTL finds another value there and steps down. Every write of placements checks, in the same Lua script,
that the lease still holds this holder's value (`PlacementStore.commit`), so a deposed leader cannot write
even in the moment before it notices.

Locally, the holder counts itself leader only until `clock() at the renewal's start + ttl`: that is never
later than the key's expiry in Redis, so a paused leader wakes up already knowing it may be deposed.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import redis.asyncio as redis

from shared.errors import Unavailable

log = logging.getLogger("magi.scheduler.lease")

LEADER_KEY = "magi:sched:leader"
TOKEN_KEY = "magi:sched:leader:token"

# KEYS: leader, token counter. ARGV: holder, ttl ms. The new value, or nil while someone else holds it.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

# KEYS: leader. ARGV: our value, ttl ms. 1 when renewed, 0 when the lease is no longer ours.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class NotLeader(Unavailable):
    """A write reached a scheduler that is not (or no longer) the leader: retry, the leader will answer."""


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class Lease:
    def __init__(self, client: redis.Redis, holder: str, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.holder = holder
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self.clock = clock
        self.value = ""  # `<token>:<holder>` while we hold it
        self.valid_until = 0.0
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def token(self) -> int:
        return int(self.value.partition(":")[0]) if self.value else 0

    def held(self) -> bool:
        """Ours for certain: a later moment than `valid_until` may already belong to another holder."""
        return bool(self.value) and self.clock() < self.valid_until

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it; True when it is ours now."""
        started = self.clock()
        value = _text(await self._acquire(keys=[LEADER_KEY, TOKEN_KEY], args=[self.holder, self.ttl_ms]))
        if not value:
            return False
        self.value, self.valid_until = value, started + self.ttl_ms / 1000
        return True

    async def renew(self) -> bool:
        """Extend our lease; False (and no longer ours) when another holder has it or it expired."""
        if not self.value:
            return False
        started = self.clock()
        if await self._renew(keys=[LEADER_KEY], args=[self.value, self.ttl_ms]):
            self.valid_until = started + self.ttl_ms / 1000
            return True
        self.drop()
        return False

    def drop(self) -> None:
        self.value, self.valid_until = "", 0.0

    async def release(self) -> None:
        """Give the lease up at once (a clean shutdown), so a standby need not wait out the TTL."""
        value = self.value
        self.drop()  # ours no longer, whatever Redis answers
        if value:
            await self._release(keys=[LEADER_KEY], args=[value])

    async def leader(self) -> str:
        """Who holds the lease now, by name ('' when nobody does)."""
        return _text(await self.redis.get(LEADER_KEY)).partition(":")[2]

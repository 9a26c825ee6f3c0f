"""Placements and the placement epoch, kept in Redis so a restarted scheduler resumes exactly.

The epoch only grows: every change to placements gets a new one, agents ignore assignment lists older
than the newest they have seen, and nothing is decided on a stale view. Every write is one Lua script
that first checks the leader's lease still holds the writer's fencing value (services.scheduler.lease):
a deposed leader's write changes nothing, whatever it was paused in the middle of.
"""

from __future__ import annotations

import logging

import msgspec
import redis.asyncio as redis

from protos.sched import PlacementRecord
from services.scheduler.lease import LEADER_KEY, NotLeader

log = logging.getLogger("magi.scheduler.placements")

PLACEMENTS_KEY = "magi:placements"
EPOCH_KEY = "magi:epoch"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PlacementRecord)

# KEYS: leader, placements, epoch. ARGV: fence, epoch, count of changed, then ids and records, then deleted ids.
# -1: fenced out; 0: written; otherwise the stored epoch, which is not below the one offered (nothing written).
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local stored = tonumber(redis.call('GET', KEYS[3]) or '0')
if stored >= tonumber(ARGV[2]) then return stored end
local changed = tonumber(ARGV[3])
for i = 0, changed - 1 do redis.call('HSET', KEYS[2], ARGV[4 + 2 * i], ARGV[5 + 2 * i]) end
for i = 4 + 2 * changed, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
redis.call('SET', KEYS[3], ARGV[2])
return 0
"""

# KEYS: leader, epoch. ARGV: fence, floor. The epoch after raising it to at least `floor` (-1: fenced out).
_RAISE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local stored = tonumber(redis.call('GET', KEYS[2]) or '0')
if stored >= tonumber(ARGV[2]) then return stored end
redis.call('SET', KEYS[2], ARGV[2])
return tonumber(ARGV[2])
"""


class PlacementStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._commit = client.register_script(_COMMIT)
        self._raise = client.register_script(_RAISE)

    async def load(self) -> tuple[dict[str, PlacementRecord], int]:
        raw = await self.redis.hgetall(PLACEMENTS_KEY)
        records = {}
        for key, value in raw.items():
            try:
                record = _decoder.decode(value)
            except msgspec.MsgspecError as exc:
                log.warning("skipped a bad stored placement", extra={"instance": str(key), "error": str(exc)})
                continue
            records[record.spec.instance_id] = record
        return records, int(await self.redis.get(EPOCH_KEY) or 0)

    async def commit(self, records: list[PlacementRecord], deleted: list[str], epoch: int, fence: str) -> int:
        """Write `records`, delete `deleted` and set the epoch, all or nothing, if `fence` still holds the lease.

        Returns 0 when written, or the stored epoch when it is not below `epoch` (nothing written: stamp the
        records above it and try again). Raises NotLeader when the lease is another's."""
        args: list[object] = [fence, epoch, len(records)]
        for record in records:
            args += [record.spec.instance_id, _encoder.encode(record)]
        args += list(deleted)
        result = int(await self._commit(keys=[LEADER_KEY, PLACEMENTS_KEY, EPOCH_KEY], args=args))
        if result < 0:
            raise NotLeader("this scheduler is no longer the leader; retry")
        return result

    async def raise_epoch(self, floor: int, fence: str) -> int:
        """The stored epoch raised to at least `floor` (never lowered); NotLeader when fenced out."""
        result = int(await self._raise(keys=[LEADER_KEY, EPOCH_KEY], args=[fence, floor]))
        if result < 0:
            raise NotLeader("this scheduler is no longer the leader; retry")
        return result

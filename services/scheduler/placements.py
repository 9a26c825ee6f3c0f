"""Placements and the placement epoch, kept in Redis so a restarted scheduler resumes exactly.

The epoch only grows (Redis INCR): every change to placements gets a new one, agents ignore
assignment lists older than the newest they have seen, and nothing is decided on a stale view.
"""

from __future__ import annotations

import logging

import msgspec
import redis.asyncio as redis

from protos.sched import PlacementRecord

log = logging.getLogger("magi.scheduler.placements")

PLACEMENTS_KEY = "magi:placements"
EPOCH_KEY = "magi:epoch"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PlacementRecord)


class PlacementStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

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

    async def next_epoch(self) -> int:
        return int(await self.redis.incr(EPOCH_KEY))

    async def save(self, records: list[PlacementRecord], deleted: list[str] = ()) -> None:
        """One MULTI/EXEC: a crash leaves either the old placements or the new, never half."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if records:
                pipe.hset(PLACEMENTS_KEY, mapping={r.spec.instance_id: _encoder.encode(r) for r in records})
            if deleted:
                pipe.hdel(PLACEMENTS_KEY, *deleted)
            await pipe.execute()

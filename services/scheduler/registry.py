"""The node registry: heartbeats persisted in Redis, receipt times kept in this process."""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as redis

from protos.node import Heartbeat, NodeState
from services.scheduler.health import node_state

NODES_KEY = "magi:nodes"
MAINTENANCE_KEY = "magi:maintenance"

_decoder = msgspec.json.Decoder(Heartbeat)


class NodeRegistry:
    def __init__(self, client: redis.Redis, interval: float) -> None:
        self.redis = client
        self.interval = interval
        self.heartbeats: dict[str, Heartbeat] = {}
        self.last_seen: dict[str, float] = {}  # monotonic time of receipt, never the agent's clock

    @classmethod
    async def open(cls, url: str, interval: float) -> "NodeRegistry":
        registry = cls(redis.from_url(url), interval)
        await registry.load()
        return registry

    async def load(self) -> None:
        """Nodes known before a restart are listed, UNAVAILABLE until they are heard from again."""
        for name, raw in (await self.redis.hgetall(NODES_KEY)).items():
            hb = _decoder.decode(raw)
            self.heartbeats[hb.node] = hb

    async def record(self, hb: Heartbeat) -> None:
        self.last_seen[hb.node] = time.monotonic()
        self.heartbeats[hb.node] = hb
        await self.redis.hset(NODES_KEY, hb.node, msgspec.json.encode(hb))

    async def nodes(self) -> list[NodeState]:
        now = time.monotonic()
        maintenance = {m.decode() for m in await self.redis.smembers(MAINTENANCE_KEY)}
        return [
            node_state(hb, self.last_seen.get(name), now, self.interval, name in maintenance)
            for name, hb in sorted(self.heartbeats.items())
        ]

    async def close(self) -> None:
        await self.redis.aclose()

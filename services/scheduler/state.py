"""The node registry: heartbeats persisted in Redis, receipt times kept in this process.

Redis holds the last heartbeat of every node (hash `magi:nodes`, field = node name) and the nodes
under maintenance (set `magi:maintenance`), so a restarted scheduler still lists every known node.
When each node was last heard from lives only here, by this process's monotonic clock: neither a
restart nor an agent's skewed wall clock can make a silent node look alive.
"""

from __future__ import annotations

import logging
import time
from typing import Callable
from urllib.parse import urlparse

import msgspec
import redis.asyncio as redis

from protos.node import Heartbeat, NodeState
from services.scheduler.health import node_state
from shared.errors import Unavailable

log = logging.getLogger("magi.scheduler.state")

NODES_KEY = "magi:nodes"
MAINTENANCE_KEY = "magi:maintenance"
REDIS_TIMEOUT_S = 2.0  # a hung Redis must not stall the heartbeat subscription indefinitely

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Heartbeat)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NodeRegistry:
    def __init__(self, client: redis.Redis, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.interval = interval
        self.clock = clock
        self.heartbeats: dict[str, Heartbeat] = {}
        self.last_seen: dict[str, float] = {}  # clock() at receipt, never the agent's sent_at

    @classmethod
    async def open(cls, url: str, interval: float) -> "NodeRegistry":
        client = redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        registry = cls(client, interval)
        try:
            await registry.load()
        except (redis.RedisError, OSError) as exc:
            await client.aclose()
            where = urlparse(url)  # host and port only: the URL may carry a password
            raise Unavailable(f"cannot reach Redis at {where.hostname}:{where.port} (MAGI_REDIS_URL): {exc}") from None
        return registry

    async def load(self) -> None:
        """Nodes known before a restart are listed, UNAVAILABLE until they are heard from again."""
        for field, raw in (await self.redis.hgetall(NODES_KEY)).items():
            name = _text(field)
            try:
                hb = _decoder.decode(raw)
            except msgspec.MsgspecError as exc:
                log.warning("skipped a bad stored heartbeat", extra={"node": name, "error": str(exc)})
                continue
            if hb.node != name:
                log.warning("skipped a stored heartbeat under another name", extra={"node": name, "hb_node": hb.node})
                continue
            self.heartbeats.setdefault(name, hb)
        log.info("loaded known nodes", extra={"nodes": sorted(self.heartbeats)})

    async def record(self, hb: Heartbeat) -> None:
        # Liveness first and in memory: a failing Redis write still counts as hearing from the node.
        self.last_seen[hb.node] = self.clock()
        self.heartbeats[hb.node] = hb
        await self.redis.hset(NODES_KEY, hb.node, _encoder.encode(hb))

    async def set_maintenance(self, node: str, on: bool) -> None:
        if on:
            await self.redis.sadd(MAINTENANCE_KEY, node)
        else:
            await self.redis.srem(MAINTENANCE_KEY, node)

    async def maintenance(self) -> set[str]:
        return {_text(m) for m in await self.redis.smembers(MAINTENANCE_KEY)}

    async def nodes(self) -> list[NodeState]:
        under_maintenance = await self.maintenance()
        now = self.clock()
        return [
            # The agent's own interval when it says one; a slower agent is not judged by a faster clock.
            node_state(hb, self.last_seen.get(name), now, hb.interval_s or self.interval, name in under_maintenance)
            for name, hb in sorted(self.heartbeats.items())
        ]

    async def close(self) -> None:
        await self.redis.aclose()

"""Replica pools: a request waits for a free ready replica, so replicas pull work when free and no
replica queues requests while another idles (never random queue-group hot spots).

Each replica serves one request at a time, or up to its model's `max_batch` when it batches (a free
slot is then what makes a replica free, and the one with the most free slots is chosen). A replica
whose process dies is marked `restarting` and started again in the background (keeper.py); a request
it was serving is retried once on whichever replica frees up next, so the caller only sees latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from protos.infer import ModelInfo, ReplicaInfo
from services.inference.budget import RestartBudget
from services.inference.catalog import ModelSpec
from shared.errors import Unavailable

log = logging.getLogger("magi.inference.pool")

LIVE_STATES = ("starting", "ready", "restarting")


@dataclass
class Replica:
    replica_id: str
    actor: Any
    node: str = ""
    state: str = "starting"
    pid: int = 0
    restarts: int = 0
    shards: list[str] = field(default_factory=list)
    shard_actors: list[Any] = field(default_factory=list)
    in_flight: int = 0
    served: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    ready_since: float = 0.0
    placed: list[str] = field(default_factory=list)  # nodes as placed: the replica's, then its shards'
    budget: RestartBudget = field(default_factory=RestartBudget)
    draining: bool = False  # being replaced: finishes what it serves, takes nothing new
    _busy_until: float = 0.0  # a batched replica: when its latest released request ended

    def overlap(self, busy_s: float) -> float:
        """Of a request that ran `busy_s` until now, the part after the latest earlier release: summed over
        a batched replica's overlapping requests this stays close to the wall time with something in
        flight (never more), where the plain sum would count each shared step once per sequence."""
        now = time.monotonic()
        start = max(now - busy_s, self._busy_until)
        self._busy_until = max(self._busy_until, now)
        return max(0.0, now - start)

    @property
    def index(self) -> int:
        return int(self.replica_id.rsplit("/", 1)[1])

    def mark_ready(self, meta: dict) -> None:
        self.node, self.pid, self.state = meta["node"], meta["pid"], "ready"
        self.ready_since = self.ready_since or time.monotonic()

    def info(self) -> ReplicaInfo:
        rate = self.tokens / self.busy_s if self.busy_s > 0 else 0.0
        up = time.monotonic() - self.ready_since if self.ready_since else 0.0
        return ReplicaInfo(
            replica=self.replica_id, node=self.node, state=self.state, in_flight=self.in_flight,
            served=self.served, tokens_per_s=round(rate, 2), pid=self.pid, restarts=self.restarts,
            utilisation=round(min(1.0, self.busy_s / up), 3) if up > 0 else 0.0, shards=list(self.shards),
        )


@dataclass
class ModelPool:
    spec: ModelSpec
    threads: int
    source_path: str
    replicas: list[Replica] = field(default_factory=list)
    window: Any = None  # a context.ContextWindow: refuses requests that cannot fit (None: not checked)
    queued: int = 0
    # retried: requests finished on another replica after theirs died; migrated: streams continued
    # elsewhere; abandoned: streams stopped because their caller went away.
    counters: dict[str, int] = field(default_factory=lambda: {"retried": 0, "migrated": 0, "abandoned": 0})
    _changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        # Created on first use so it binds to the service's running event loop.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _free(self) -> Replica | None:
        slots = self.spec.max_batch
        free = [r for r in self.replicas if r.state == "ready" and r.in_flight < slots and not r.draining]
        # The least loaded (most free slots), then the one that has served least, so work spreads evenly.
        return min(free, key=lambda r: (r.in_flight, r.served, r.replica_id)) if free else None

    def _hopeless(self) -> bool:
        return not any(r.state in LIVE_STATES for r in self.replicas)

    async def acquire(self) -> Replica:
        """Wait for a free ready replica and reserve it; 503 when no replica can ever become ready."""
        async with self.changed:
            self.queued += 1
            try:
                await self.changed.wait_for(lambda: self._free() is not None or self._hopeless())
            finally:
                self.queued -= 1
            replica = self._free()
            if replica is None:
                raise Unavailable(f"model {self.spec.name!r} has no live replica", field="model")
            replica.in_flight += 1
            return replica

    async def release(self, replica: Replica, busy_s: float) -> None:
        async with self.changed:
            replica.in_flight -= 1
            replica.busy_s += busy_s if self.spec.max_batch == 1 else replica.overlap(busy_s)
            self.changed.notify_all()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.name, backend=self.spec.backend, roles=list(self.spec.roles),
            source=self.source_path, n_ctx=self.spec.n_ctx, threads=self.threads,
            replicas=[r.info() for r in self.replicas], queued=self.queued, max_batch=self.spec.max_batch,
        )

    def replica_stats(self, replica: Replica) -> dict:
        info = replica.info()
        return {"model": self.spec.name, "replica": info.replica, "node": info.node, "state": info.state,
                "in_flight": info.in_flight, "served": info.served, "tokens": replica.tokens,
                "tokens_per_s": info.tokens_per_s, "utilisation": info.utilisation}

    def stats(self) -> dict:
        ready = [r for r in self.replicas if r.state == "ready"]
        busy = sum(r.in_flight for r in self.replicas)
        slots = len(ready) * self.spec.max_batch
        return {"queued": self.queued, "in_flight": busy, "ready": len(ready),
                "utilisation": round(busy / slots, 3) if slots else 0.0, **self.counters}

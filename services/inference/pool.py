"""Replica pools: a request waits for a free ready replica, so replicas pull work when free and no
replica queues requests while another idles (never random queue-group hot spots).

Each replica serves one request at a time, or up to its model's `max_batch` when it batches (a free
slot is then what makes a replica free, and the one with the most free slots is chosen). A replica
whose process dies is marked `restarting` and started again in the background (keeper.py); a request
it was serving is retried once on whichever replica frees up next, so the caller only sees latency.

Admission: at most the model's `queue_bound` requests wait (catalog.py, `max_queue`). One more is refused at
once with a 503 whose `retry_after_s` is about how long the queue ahead takes to drain (its length times the
recent time a request holds a slot, over the slots), so past saturation callers hear "come back in N s" within
milliseconds instead of piling up until their deadlines expire. A retry after a replica died was admitted
already and is never refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any

from protos.infer import ModelInfo, ReplicaInfo
from services.inference.budget import RestartBudget
from services.inference.catalog import ModelSpec
from shared.errors import Unavailable

log = logging.getLogger("magi.inference.pool")

LIVE_STATES = ("starting", "ready", "restarting")
# The retry hint's limits: never "now" (the queue was full a moment ago), never so long a caller gives up.
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 0.1, 30.0
# A pool's state while it serves, as opposed to the settings a reload replaces (ModelPool.take_settings).
RUNTIME_FIELDS = frozenset({"replicas", "queued", "counters", "refused", "service_s", "revision", "_changed"})
SERVICE_TIME_WEIGHT = 0.2  # of each finished request in the moving average of the time a request holds a slot


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
    draining: bool = False  # being replaced or removed: finishes what it serves, takes nothing new
    revision: int = 0  # the pool's `revision` whose settings built this replica's actor
    _busy_until: float = 0.0  # a batched replica: when its latest released request ended
    digest: str = ""  # sha256:<hex> of the file the replica loaded (weights.py)

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
            digest=self.digest,
        )


@dataclass
class ModelPool:
    spec: ModelSpec
    threads: int
    source_path: str
    replicas: list[Replica] = field(default_factory=list)
    window: Any = None  # a context.ContextWindow: refuses requests that cannot fit (None: not checked)
    digest: str = ""  # sha256:<hex> every replica loads: the head's copy, hashed or fetched at start (weights.py)
    download_bytes: int = 0  # a store model's size: what a node without it downloads (0: a local source)
    queued: int = 0
    # retried: requests finished on another replica after theirs died; migrated: streams continued
    # elsewhere; abandoned: streams stopped because their caller went away.
    counters: dict[str, int] = field(default_factory=lambda: {"retried": 0, "migrated": 0, "abandoned": 0})
    refused: int = 0  # requests turned away because `queue_bound` were already waiting (router.queue_stats)
    service_s: float = 0.0  # moving average of the time a request held its slot (0: none finished yet)
    # Counts changes of the settings a replica is built from (reconcile.py): a replica of an older revision is
    # replaced, one at a time.
    revision: int = 0
    _changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        # Created on first use so it binds to the service's running event loop.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def take_settings(self, other: ModelPool) -> None:
        """Adopt another pool's settings (spec, weights, threads, window, ...) and count a new revision; the
        replicas, queue and counters stay (a reload replaces replicas one at a time, reconcile.py)."""
        for f in fields(self):
            if f.name not in RUNTIME_FIELDS:
                setattr(self, f.name, getattr(other, f.name))
        self.revision += 1

    def next_index(self) -> int:
        """The lowest replica index not in use, so a pool scaled down and up again keeps ids 0..n-1."""
        used = {r.index for r in self.replicas}
        return next(i for i in range(len(used) + 1) if i not in used)

    async def drained(self, replica: Replica | None = None, *, timeout_s: float) -> bool:
        """Wait until `replica` (None: the whole pool, its queue included) has nothing in flight; False when
        `timeout_s` passed first. The caller has stopped new work reaching it (draining, or the pool removed)."""
        def idle() -> bool:
            if replica is not None:
                return replica.in_flight == 0
            return self.queued == 0 and all(r.in_flight == 0 for r in self.replicas)

        try:
            async with asyncio.timeout(timeout_s):
                async with self.changed:
                    await self.changed.wait_for(idle)
            return True
        except TimeoutError:
            return False

    def _free(self) -> Replica | None:
        slots = self.spec.max_batch
        free = [r for r in self.replicas if r.state == "ready" and r.in_flight < slots and not r.draining]
        # The least loaded (most free slots), then the one that has served least, so work spreads evenly.
        return min(free, key=lambda r: (r.in_flight, r.served, r.replica_id)) if free else None

    def _hopeless(self) -> bool:
        return not any(r.state in LIVE_STATES for r in self.replicas)

    def _full(self) -> bool:
        bound = self.spec.queue_bound
        return bound > 0 and self.queued >= bound and self._free() is None

    def retry_after_s(self) -> float:
        """How long until the requests waiting now have been served, by the recent time a request holds a
        slot (before any has finished: one second per waiting request per slot, a guess on the long side)."""
        slots = max(1, sum(1 for r in self.replicas if r.state in LIVE_STATES) * self.spec.max_batch)
        per_request = self.service_s or 1.0
        return round(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, self.queued * per_request / slots)), 2)

    def _refuse(self) -> Unavailable:
        self.refused += 1
        return Unavailable(f"model {self.spec.name!r} is saturated: {self.queued} requests already wait for a "
                           "replica (its max_queue); retry later", field="model", retry_after_s=self.retry_after_s())

    async def acquire(self, *, admitted: bool = False) -> Replica:
        """Wait for a free ready replica and reserve it; 503 when no replica can ever become ready, or at once
        (with a retry hint) when the queue is full. `admitted`: a retry of a request already let in."""
        async with self.changed:
            if not admitted and self._full():
                raise self._refuse()
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
            if busy_s > 0:  # 0: released unused (a cancelled request)
                w = SERVICE_TIME_WEIGHT if self.service_s else 1.0
                self.service_s += w * (busy_s - self.service_s)
            self.changed.notify_all()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.name, backend=self.spec.backend, roles=list(self.spec.roles),
            source=self.source_path, n_ctx=self.spec.n_ctx, threads=self.threads,
            replicas=[r.info() for r in self.replicas], queued=self.queued, max_batch=self.spec.max_batch,
            digest=self.digest,
        )

    def replica_stats(self, replica: Replica) -> dict:
        info = replica.info()
        return {"model": self.spec.name, "replica": info.replica, "node": info.node, "state": info.state,
                "in_flight": info.in_flight, "served": info.served, "tokens": replica.tokens,
                "tokens_per_s": info.tokens_per_s, "utilisation": info.utilisation, "digest": info.digest}

    def stats(self) -> dict:
        ready = [r for r in self.replicas if r.state == "ready"]
        busy = sum(r.in_flight for r in self.replicas)
        slots = len(ready) * self.spec.max_batch
        return {"queued": self.queued, "in_flight": busy, "ready": len(ready),
                "utilisation": round(busy / slots, 3) if slots else 0.0, **self.counters}

"""`magi.node.<node>.models.fetch`: the node's agent puts a model of the bus's model store into the node's cache
(`$MAGI_HOME/models/<hex>.gguf`, shared/modelstore.py), verified by its digest, before a replica of it is started
here; the inference service then hands that path to the replica actor it pins to this node.

What is never evicted: the digests asked for in the last KEEP_S. A replica asks at every start (restarts
included), so a model a replica runs on this node was asked for no longer ago than that replica's start; KEEP_S
is long enough that a replica still loading, or one just restarted, finds its file. Deleting a file a running
replica has mapped would not break that replica anyway (Linux keeps an unlinked file's pages until it is
unmapped), only its next restart, which asks for the file again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import psutil

from protos.node import ModelFetchReply, ModelFetchRequest
from shared import modelstore
from shared.config import Settings

log = logging.getLogger("magi.agent.models")

KEEP_S = 6 * 3600.0
GB = 1024**3


class NodeModels:
    """One node's model cache and the digests its replicas asked for (kept from eviction for KEEP_S)."""

    def __init__(self, node: str, settings: Settings) -> None:
        self.node = node
        self.cache = modelstore.ModelCache(settings.home_path / "models", settings.model_cache_bytes)
        self.asked: dict[str, float] = {}  # digest -> monotonic time of the latest fetch that named it
        self._one_at_a_time = asyncio.Lock()  # one download at a time: room is made against what is on disk

    def keep(self) -> frozenset[str]:
        horizon = time.monotonic() - KEEP_S
        self.asked = {d: t for d, t in self.asked.items() if t >= horizon}
        return frozenset(self.asked)

    async def fetch(self, js, req: ModelFetchRequest) -> ModelFetchReply:
        started = time.perf_counter()
        async with self._one_at_a_time:
            model, path, cached = await modelstore.fetch_into(js, req.name, self.cache, digest=req.digest,
                                                              keep=self.keep())
        self.asked[model.digest] = time.monotonic()
        fetch_ms = round((time.perf_counter() - started) * 1000, 2)
        log.info("model ready on node", extra={"node": self.node, "model": req.name, "digest": model.digest,
                                              "cached": cached, "fetch_ms": fetch_ms})
        return ModelFetchReply(node=self.node, name=req.name, path=str(path), digest=model.digest, size=model.size,
                               cached=cached, fetch_ms=fetch_ms)

    def holdings(self, keep: frozenset[str]) -> tuple[list[str], float]:
        """The digests in the cache, and the GB a new model may take here: free disk plus what eviction could
        free (files not in `keep`), no more than the cache's cap leaves beside the kept files (blocking: call it
        off the event loop)."""
        sizes = {f"sha256:{p.stem}": _size(p) for p in self.cache.files()}
        kept = sum(size for digest, size in sizes.items() if digest in keep)
        room = psutil.disk_usage(str(self.cache.root)).free + sum(sizes.values()) - kept
        if self.cache.max_bytes:
            room = min(room, max(0, self.cache.max_bytes - kept))
        return sorted(sizes), round(room / GB, 3)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # evicted between the listing and now
        return 0

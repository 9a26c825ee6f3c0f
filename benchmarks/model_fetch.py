"""Model fetch: a model file's download from the bus's model store into a node's cache, against reading the
file directly, in the same run (issue 13, `models.fetch_mb_per_s`).

A private stack (NATS with JetStream and MAGI's permissions; no MAGI service) on loopback. A synthetic model
file of FILE_MB random MiB is written and uploaded once. Then, alternately (so drift in the machine's load
hits both alike):
- direct: the file read and hashed (SHA-256) from disk, as a node does to check a local model's digest;
- fetch: `modelstore.fetch` as a node's agent (its identity and permissions): the object's chunks streamed
  into a part file in an empty cache, the SHA-256 checked by nats-py on the way and again on the file, the
  file moved into place. The cache is emptied before each round, so each round downloads.
Both read warm data (the file and the stream's blocks sit in the page cache after the first round), so the
ratio compares the store's path with a local read of the same bytes, not two disks.

Figures: `models.fetch_mb_per_s` and `models.direct_mb_per_s` (MiB/s, the median round),
`models.fetch.ratio_vs_direct` (the median of each round's fetch rate over its direct rate: a round's two
sides run back to back, so a busy moment slows both), and each side's spread (slowest round over fastest).
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from magi import stack
from magi.procs import free_port
from shared import modelstore
from shared.roles import agent_identity

log = logging.getLogger("magi.bench.model_fetch")

FILE_MB = 256
ROUNDS = 9  # each side
NODE = "benchnode"
NAME = "bench-model"


def _write_model(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(2**20))


def _direct(path: Path) -> float:
    """Seconds to read and hash the file (blocking)."""
    started = time.perf_counter()
    modelstore.file_digest(path)
    return time.perf_counter() - started


async def _fetch(js, cache: modelstore.ModelCache, digest: str) -> float:
    for old in cache.files():
        old.unlink()
    started = time.perf_counter()
    model, path = await modelstore.fetch(js, NAME, cache, digest=digest)
    elapsed = time.perf_counter() - started
    assert model.digest == digest and path.stat().st_size == model.size
    return elapsed


async def measure_model_fetch(progress=lambda _m: None, file_mb: int = FILE_MB, rounds: int = ROUNDS) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="magi-model-fetch-") as tmp:
        home = Path(tmp)
        cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=(), agents=(NODE,))
        state = await stack.up(cfg, progress)
        try:
            source = home / "model.gguf"
            progress(f"writing a {file_mb} MiB model file and uploading it")
            await asyncio.to_thread(_write_model, source, file_mb)
            admin = await stack.connect_as(state.home, state.nats_url, "admin")
            agent = await stack.connect_as(state.home, state.nats_url, agent_identity(NODE))
            try:
                stored = await modelstore.upload(admin.jetstream(), NAME, source)
                cache = modelstore.ModelCache(home / "node-cache")
                direct, fetched = [], []
                for i in range(rounds + 1):  # the first round of each warms the page cache: not counted
                    d = await asyncio.to_thread(_direct, source)
                    f = await _fetch(agent.jetstream(), cache, stored.digest)
                    if i:
                        direct.append(d)
                        fetched.append(f)
                        progress(f"round {i}/{rounds}: direct {file_mb / d:.0f} MiB/s, fetch {file_mb / f:.0f} MiB/s")
            finally:
                await agent.close()
                await admin.close()
        finally:
            stack.down(home, progress)
    direct_rate, fetch_rate = file_mb / statistics.median(direct), file_mb / statistics.median(fetched)
    ratio = statistics.median(d / f for d, f in zip(direct, fetched))
    figures = {
        "models.fetch_mb_per_s": round(fetch_rate, 1),
        "models.direct_mb_per_s": round(direct_rate, 1),
        "models.fetch.ratio_vs_direct": round(ratio, 3),
        "models.fetch.spread": round(max(fetched) / min(fetched), 3),
        "models.direct.spread": round(max(direct) / min(direct), 3),
        "models.fetch.file_mb": file_mb,
        "models.fetch.rounds": rounds,
    }
    log.info("model fetch benchmark", extra={"figures": figures})
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure_model_fetch(lambda m: print("...", m, flush=True))), indent=2))

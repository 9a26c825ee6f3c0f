"""Failover time: from kill -9 of a node's agent to its instance running on another node."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

from magi.localcluster import LocalCluster


async def measure_failover(heartbeat_s: float = 1.0) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="magi-failover-") as tmp:
        cluster = LocalCluster(Path(tmp), heartbeat_s=heartbeat_s)
        await cluster.up()
        try:
            await cluster.start("sched", "services.scheduler")
            await cluster.start("a", "services.agent", "node-a")
            await cluster.start("b", "services.agent", "node-b")
            await cluster.place_on("bench-worker", "node-a")
            killed = time.monotonic()
            os.kill(cluster.procs["a"].pid, signal.SIGKILL)
            await cluster.until(lambda: cluster.runs_on("bench-worker", "node-b"), timeout=30)
            seconds = time.monotonic() - killed
        finally:
            await cluster.down()
    return {"sched.failover_s": round(seconds, 3), "sched.failover.heartbeat_s": heartbeat_s}

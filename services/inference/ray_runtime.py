"""Starting or joining Ray, confined to loopback for the local stack.

On Linux Ray binds all interfaces unless told otherwise; with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(Ray's local single-node mode) `ray.init()` uses 127.0.0.1 and every Ray process listens on loopback
only. A multi-node cluster is joined by address instead (`ray start --node-ip-address <cluster addr>`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from shared.config import Settings

# Read by Ray when it is imported, so it must be set before any `import ray` in this process
# (replica.py imports this module first). Single-node mode keeps a local Ray on loopback; a process
# that joins a multi-node cluster (MAGI_RAY_ADDRESS) must not set it, and needs Ray's token auth.
if os.environ.get("MAGI_RAY_ADDRESS"):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
else:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

log = logging.getLogger("magi.inference.ray")


def _temp_dir(home: Path) -> str:
    # Ray puts unix sockets under its temp dir; deep paths overflow the 107-byte socket limit.
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:10]
    return f"/tmp/magi-ray/{digest}"


def start_ray(settings: Settings):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace="magi", log_to_driver=False)
    else:
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=_temp_dir(settings.home_path),
            object_store_memory=128 * 1024 * 1024,
            # Replicas pin themselves to a MAGI node through this resource (see replicas.py).
            resources={f"magi_node:{settings.node()}": 1000},
            namespace="magi",
            log_to_driver=False,
        )
    log.info("ray ready", extra={"address": settings.ray_address or "local", "nodes": len(ray.nodes())})
    return ray


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()

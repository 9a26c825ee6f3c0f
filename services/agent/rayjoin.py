"""Joining this node to the inference service's Ray cluster, as an instance the agent supervises.

With `MAGI_RAY_JOIN=HEAD:PORT` the agent runs `ray start --block` against that head, on this node's
cluster address, with the custom resource `magi_node:<node>` that replica and shard actors ask for, so
Ray runs each one exactly where the scheduler placed it. It restarts like any `always` instance, and
stops with the agent. Ray itself stays an implementation detail of the inference service.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from protos.sched import InstanceSpec
from shared.config import Settings

RAY_WORKER_ID = "ray-worker"
NODE_RESOURCE_UNITS = 1000  # each actor asks for 0.001: the resource marks the node, it does not ration it


def ray_worker_spec(settings: Settings, node: str) -> InstanceSpec | None:
    if not settings.ray_join:
        return None
    ray_bin = str(Path(sysconfig.get_path("scripts")) / "ray")
    command = [
        ray_bin, "start", "--block", "--address", settings.ray_join,
        "--node-ip-address", settings.cluster_address,
        "--resources", json.dumps({f"magi_node:{node}": NODE_RESOURCE_UNITS}),
        "--num-cpus", str(os.cpu_count() or 1), "--disable-usage-stats",
    ]
    # Ray's token auth is on by default: the head's token file must be on this node too (see README).
    # The switch MAGI's local Ray uses to stay on loopback (single-node mode) must be off for a join.
    return InstanceSpec(instance_id=RAY_WORKER_ID, ram_gb=0.0, command=command, restart="always",
                        env={"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})

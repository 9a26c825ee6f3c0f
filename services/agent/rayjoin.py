"""The node's part of the inference service's Ray cluster, as instances the agent supervises.

With `MAGI_RAY_HEAD_PORT` (the head node) the agent runs `ray start --head --block` there; with
`MAGI_RAY_JOIN=HEAD:PORT` (every other node) it runs `ray start --block` against that head. Both bind
this node's cluster address (`MAGI_CLUSTER_ADDRESS`, never a wildcard or public address), take fixed
ports (so the README's firewall table can name every one), carry the custom resource `magi_node:<node>`
that replica and shard actors ask for, and refuse to start without Ray's token auth: an
unauthenticated Ray head lets anyone who reaches it run code. They restart like any `always` instance
and stop with the agent. Ray itself stays an implementation detail of the inference service.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sysconfig
from pathlib import Path

from protos.sched import InstanceSpec
from shared.config import Settings
from shared.errors import BadRequest

RAY_WORKER_ID = "ray-worker"
RAY_HEAD_ID = "ray-head"
NODE_RESOURCE_UNITS = 1000  # each actor asks for 0.001: the resource marks the node, it does not ration it

# Every port a Ray node listens on besides the head's GCS port (Ray picks random ones otherwise).
RAY_NODE_PORTS = {"--node-manager-port": 6381, "--object-manager-port": 6382, "--runtime-env-agent-port": 6383,
                  "--dashboard-agent-grpc-port": 6384, "--dashboard-agent-listen-port": 6385,
                  "--metrics-export-port": 6386}
RAY_WORKER_PORTS = (10002, 10099)  # one per worker process
# The head's autoscaler monitor serves Prometheus metrics on every interface (whenever prometheus-client is
# installed, as it is for the gateway's /metrics) at a port set only by this variable: fixed here, beside
# the other Ray ports, so each node's firewall keeps it to cluster members.
AUTOSCALER_METRIC_PORT = 6387
# MAGI passes prompts and text through Ray, never tensors: a small store instead of Ray's 30 % of RAM.
OBJECT_STORE_BYTES = 256 * 1024 * 1024


def ray_token_present(environ=os.environ) -> bool:
    """Ray's token as Ray looks for it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def cluster_ip(settings: Settings) -> str:
    """This node's cluster address, refused when it would expose Ray beyond a private network."""
    try:
        address = ipaddress.ip_address(settings.cluster_address)
    except ValueError:
        raise BadRequest(f"MAGI_CLUSTER_ADDRESS={settings.cluster_address!r} must be this node's IP address on the "
                         "cluster network", field="cluster_address") from None
    if address.is_unspecified or address.is_global:
        raise BadRequest(f"MAGI_CLUSTER_ADDRESS={address} would expose Ray beyond the cluster network: give the "
                         "node's private cluster address", field="cluster_address")
    return str(address)


def _common(settings: Settings, node: str) -> list[str]:
    if not ray_token_present():
        raise BadRequest("Ray needs its cluster token on this node (RAY_AUTH_TOKEN_PATH, written by "
                         "`magi cluster init`); refusing to run Ray without authentication", field="ray_token")
    ports = [str(p) for kv in RAY_NODE_PORTS.items() for p in kv]
    return [
        "--node-ip-address", cluster_ip(settings), *ports,
        "--min-worker-port", str(RAY_WORKER_PORTS[0]), "--max-worker-port", str(RAY_WORKER_PORTS[1]),
        "--resources", json.dumps({f"magi_node:{node}": NODE_RESOURCE_UNITS}),
        "--num-cpus", str(os.cpu_count() or 1), "--disable-usage-stats",
        "--object-store-memory", str(OBJECT_STORE_BYTES),
        *(["--temp-dir", settings.ray_temp_dir] if settings.ray_temp_dir else []),
    ]


# Token auth on; and Linux's default multi-node mode, undoing the single-node switch MAGI's local Ray
# uses (an agent started beside a local stack may inherit it). Binding follows --node-ip-address.
_RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "AUTOSCALER_METRIC_PORT": str(AUTOSCALER_METRIC_PORT)}


def _ray_bin() -> str:
    return str(Path(sysconfig.get_path("scripts")) / "ray")


def ray_worker_spec(settings: Settings, node: str) -> InstanceSpec | None:
    if not settings.ray_join:
        return None
    command = [_ray_bin(), "start", "--block", "--address", settings.ray_join, *_common(settings, node)]
    return InstanceSpec(instance_id=RAY_WORKER_ID, ram_gb=0.0, command=command, restart="always", env=_RAY_ENV)


def ray_head_spec(settings: Settings, node: str) -> InstanceSpec | None:
    if not settings.ray_head_port:
        return None
    command = [_ray_bin(), "start", "--block", "--head", "--port", str(settings.ray_head_port),
               "--include-dashboard=false", *_common(settings, node)]
    return InstanceSpec(instance_id=RAY_HEAD_ID, ram_gb=0.0, command=command, restart="always", env=_RAY_ENV)


def own_specs(settings: Settings, node: str) -> list[InstanceSpec]:
    """What the agent runs of its own accord on this node (checked now: a refusal stops the agent's start)."""
    return [s for s in (ray_head_spec(settings, node), ray_worker_spec(settings, node)) if s is not None]

"""Settings every MAGI process reads from the environment (twelve-factor style).

Nothing here holds a secret: credentials (a PostgreSQL DSN with a password, SurrealDB users) come from
the environment or from files outside git that the environment points at.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import msgspec

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_RPC_PORTS = "50100-50199"
# The scheduler's failover grace, in heartbeat intervals: a node silent this long loses its instances.
FAILOVER_MISSED_BEATS = 3
# An agent cut off from the scheduler keeps its assigned instances this many heartbeats by default.
AGENT_LEASE_BEATS = 10


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    nats_url: str = DEFAULT_NATS_URL
    home: str = ".magi"  # state, logs and data of the local stack
    node_name: str = ""
    pg_dsn: str = ""  # empty: the memory service is told the embedded pgserver's socket by `magi up`
    redis_url: str = "redis://127.0.0.1:6479/0"
    surreal_url: str = ""  # empty: embedded SurrealKV file under home
    surreal_user: str = ""
    surreal_pass: str = ""
    max_payload: int = 256 * 1024  # bytes accepted per request; larger gets 413
    heartbeat_s: float = 1.0
    models_file: str = ""  # optional YAML model catalogue; empty: the built-in SmolLM2 catalogue
    ray_address: str = ""  # empty: a local Ray confined to loopback
    request_timeout_s: float = 120.0
    cluster_file: str = ""  # optional cluster YAML: configured capacity overrides what agents report
    # This node's address on the private cluster network: Ray workers and llama.cpp RPC shards bind here.
    cluster_address: str = "127.0.0.1"
    ray_join: str = ""  # HEAD:PORT of a Ray cluster this node's agent joins (worker nodes only)
    ray_head_port: int = 0  # the head node: its agent runs the Ray head on the cluster address, this GCS port
    # Where this node's Ray keeps its sessions and sockets; on the head the inference service must see the
    # same folder (under systemd, with PrivateTmp, /var/lib/magi/ray). Empty: Ray's own /tmp/ray.
    ray_temp_dir: str = ""
    # This process's NATS nkey seed file; empty: `$MAGI_HOME/secrets/nats/<role>.nk` (the local stack's).
    nats_creds: str = ""
    rpc_ports: str = DEFAULT_RPC_PORTS  # the ports llama.cpp RPC shards take, so a firewall rule can name them
    stream_replicas: int = 1  # JetStream replicas of MAGI's streams: 3 on a 3-server NATS cluster
    agent_policy: str = ""  # what instances may run on this node; empty: /etc/magi/agent.yaml if any, else nothing
    nats_ca: str = ""  # CA that signed the NATS servers' certificates; empty: `$MAGI_HOME/secrets/tls/ca.pem` if any
    # How long an agent that hears no assignments keeps the scheduler's instances running before it stops
    # them (fences itself); 0: the default of `agent_lease()`. Never below the failover grace.
    agent_lease_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # The scheduler leader's lease in Redis (renewed every third of it): a dead leader is replaced this fast.
    sched_lease_s: Annotated[float, msgspec.Meta(gt=0)] = 3.0
    # The scheduler's exact solver (CP-SAT), when greedy leaves instances unplaced: its wall-clock budget per
    # batch; the best placement found by then is used. 0: greedy alone. A cluster file's placement.budget_s wins.
    sched_place_budget_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.25
    # Missions: a running mission tells JetStream it is alive every third of this; a crashed orchestrator's
    # missions are redelivered this long after its last sign of life.
    mission_ack_wait_s: float = 6.0
    mission_max_deliver: int = 8  # attempts (over about 90 s) before a failing mission goes to `magi.mission.dead.<id>`
    # This node's cache of model files from the bus's model store (`$MAGI_HOME/models`), least recently used
    # evicted past this size; 0: no limit.
    model_cache_bytes: Annotated[int, msgspec.Meta(ge=0)] = 20 * 2**30
    mission_concurrency: int = 16  # missions one orchestrator runs at once
    # Missions accepted and not yet finished (waiting or running), over every orchestrator: the mission stream's
    # bound, so one more is refused at once (503 with a retry hint) instead of waiting out its deadline in a
    # backlog. Set it alike on every orchestrator (the last one started sets the stream); 0: no bound.
    mission_max_pending: Annotated[int, msgspec.Meta(ge=0)] = 256
    # The OpenAI-compatible HTTP gateway (services/gateway): loopback only unless told otherwise.
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    http_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 64  # requests at once; more get 429 with Retry-After
    # HTTPS for the gateway (a PEM certificate chain and its key); `magi cluster init` issues one from the
    # cluster's CA for the head, whose gateway listens on the cluster network. Empty: plain HTTP (loopback).
    http_tls_cert: str = ""
    http_tls_key: str = ""
    api_keys_file: str = ""  # bearer API keys, one per line (or JSON); empty: `$MAGI_HOME/secrets/api_key`
    # nats-server's HTTP monitoring (/varz, /connz, /jsz...) of the local stack, on 127.0.0.1 only (it has no
    # authentication); 0: off.
    nats_monitor_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8222

    def nats_servers(self) -> list[str]:
        """MAGI_NATS_URL may list several servers of a NATS cluster, comma-separated."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def home_path(self) -> Path:
        return Path(self.home).resolve()

    def node(self) -> str:
        return self.node_name or socket.gethostname()

    def api_keys_path(self) -> Path:
        """The HTTP gateway's bearer keys: MAGI_API_KEYS_FILE, else the one `magi up` creates."""
        return Path(self.api_keys_file) if self.api_keys_file else self.home_path / "secrets" / "api_key"

    def failover_grace_s(self) -> float:
        """How long the scheduler waits on a silent node before it re-places the node's instances."""
        return FAILOVER_MISSED_BEATS * self.heartbeat_s

    def agent_lease(self) -> float:
        """The agent's lease: MAGI_AGENT_LEASE_S raised to the failover grace, so a pause too short to move
        anything never stops anything. The default also outlasts a scheduler handover (a lease and a renewal)."""
        grace = self.failover_grace_s()
        default = max(AGENT_LEASE_BEATS * self.heartbeat_s, grace + 2 * self.sched_lease_s)
        return max(self.agent_lease_s or default, grace)


_ENV = {
    "nats_url": "MAGI_NATS_URL",
    "home": "MAGI_HOME",
    "node_name": "MAGI_NODE_NAME",
    "pg_dsn": "MAGI_PG_DSN",
    "redis_url": "MAGI_REDIS_URL",
    "surreal_url": "MAGI_SURREAL_URL",
    "surreal_user": "MAGI_SURREAL_USER",
    "surreal_pass": "MAGI_SURREAL_PASS",
    "max_payload": "MAGI_MAX_PAYLOAD",
    "heartbeat_s": "MAGI_HEARTBEAT_S",
    "models_file": "MAGI_MODELS_FILE",
    "ray_address": "MAGI_RAY_ADDRESS",
    "request_timeout_s": "MAGI_REQUEST_TIMEOUT_S",
    "cluster_file": "MAGI_CLUSTER_FILE",
    "cluster_address": "MAGI_CLUSTER_ADDRESS",
    "ray_join": "MAGI_RAY_JOIN",
    "ray_head_port": "MAGI_RAY_HEAD_PORT",
    "ray_temp_dir": "MAGI_RAY_TEMP_DIR",
    "nats_creds": "MAGI_NATS_CREDS",
    "nats_ca": "MAGI_NATS_CA",
    "agent_policy": "MAGI_AGENT_POLICY",
    "stream_replicas": "MAGI_STREAM_REPLICAS",
    "rpc_ports": "MAGI_RPC_PORTS",
    "mission_ack_wait_s": "MAGI_MISSION_ACK_WAIT_S",
    "mission_max_deliver": "MAGI_MISSION_MAX_DELIVER",
    "mission_concurrency": "MAGI_MISSION_CONCURRENCY",
    "mission_max_pending": "MAGI_MISSION_MAX_PENDING",
    "http_host": "MAGI_HTTP_HOST",
    "http_port": "MAGI_HTTP_PORT",
    "http_concurrency": "MAGI_HTTP_CONCURRENCY",
    "http_tls_cert": "MAGI_HTTP_TLS_CERT",
    "http_tls_key": "MAGI_HTTP_TLS_KEY",
    "api_keys_file": "MAGI_API_KEYS_FILE",
    "nats_monitor_port": "MAGI_NATS_MONITOR_PORT",
    "agent_lease_s": "MAGI_AGENT_LEASE_S",
    "sched_lease_s": "MAGI_SCHED_LEASE_S",
    "sched_place_budget_s": "MAGI_SCHED_PLACE_BUDGET_S",
    "model_cache_bytes": "MAGI_MODEL_CACHE_BYTES",
}


def env_names() -> dict[str, str]:
    """Setting name -> environment variable, for the README's config reference and `magi up`."""
    return dict(_ENV)


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    raw = {key: environ[var] for key, var in _ENV.items() if environ.get(var, "") != ""}
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        from shared.errors import BadRequest, field_of_validation_error

        field = field_of_validation_error(str(exc))
        raise BadRequest(f"bad setting {_ENV.get(field or '', field)}: {exc}", field=field) from None


def port_range(text: str, setting: str = "MAGI_RPC_PORTS") -> range:
    """`50100-50199` (inclusive) as a range; a malformed or inverted range is a 400 naming the setting."""
    from shared.errors import BadRequest

    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise BadRequest(f"{setting}={text!r}: expected FIRST-LAST, e.g. 50100-50199", field=setting) from None
    if not 1024 <= first <= last <= 65535:
        raise BadRequest(f"{setting}={text!r}: ports must rise within 1024-65535", field=setting)
    return range(first, last + 1)

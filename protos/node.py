from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Health = Literal["HEALTHY", "DEGRADED", "UNAVAILABLE", "MAINTENANCE"]

# Header of each line an agent publishes on `magi.node.<node>.logs.<instance>`: the log file's offset just
# past that line, so a reader joins a tail (`InstanceLog.offset`) to the live lines without a repeat.
LOG_OFFSET_HEADER = "Magi-Log-Offset"


class GpuInfo(msgspec.Struct, kw_only=True):
    name: str
    memory_total_gb: float
    memory_used_gb: float = 0.0


class InstanceStatus(msgspec.Struct, kw_only=True):
    """One instance as its node's agent sees it."""

    instance_id: str
    # refused: the node's agent policy does not allow it (see `reason`); it is never started there.
    state: Literal["starting", "running", "reserved", "backoff", "crashloop", "exited", "failed", "refused"]
    epoch: int = 0
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    reason: str = ""


class Heartbeat(msgspec.Struct, kw_only=True):
    """Published by every node agent on `magi.node.<node>.heartbeat`."""

    node: str
    seq: int
    sent_at: float  # agent wall clock, informational only: liveness uses the receiver's clock
    host: str = ""
    cpu_count: int = 0
    cpu_percent: float = 0.0
    load_1m: float = 0.0
    ram_total_gb: float = 0.0
    ram_used_gb: float = 0.0
    ram_percent: float = 0.0
    disk_total_gb: float = 0.0
    disk_percent: float = 0.0
    gpus: list[GpuInfo] = []
    instances: list[InstanceStatus] = []
    health: Health = "HEALTHY"
    labels: dict[str, str] = {}
    # The agent's heartbeat interval; 0: the scheduler's own setting applies. Bounded, so no agent can
    # claim an interval that postpones its failover forever.
    interval_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0
    # The newest placement epoch the agent has accepted: a new scheduler leader never goes below it.
    epoch: int = 0
    # The node's model cache (`$MAGI_HOME/models`): the digests it holds (`sha256:<hex>`), and the bytes a new
    # model may still take there (free disk, and the cache's own cap); the scheduler prefers a node that holds
    # a replica's model and refuses one that cannot take its download.
    models: list[str] = []
    model_room_gb: float | None = None  # None: not reported (an agent without a model cache)


class NodeState(msgspec.Struct, kw_only=True):
    name: str
    status: Health
    last_seen_s: float | None  # seconds since the scheduler last heard from the node; None: not since it started
    heartbeat: Heartbeat


class NodesReply(msgspec.Struct, kw_only=True):
    nodes: list[NodeState]


class NodeReport(msgspec.Struct, kw_only=True):
    name: str
    status: str
    instances: int
    max_instances: int
    ram_allocated_gb: float
    ram_total_gb: float
    ram_utilization_percent: float
    gpu: bool


class ClusterReport(msgspec.Struct, kw_only=True):
    """`magi.sched.report`: the seed-002 resource report."""

    timestamp: str
    total_nodes: int
    total_instances: int
    nodes: list[NodeReport]
    warnings: list[str] = []


class LogsRequest(msgspec.Struct, kw_only=True):
    """`magi.node.<node>.logs`: the last lines of instances' output, read by the node's agent from its files."""

    instance: str = ""  # empty: every instance with a log on this node
    lines: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 100


class InstanceLog(msgspec.Struct, kw_only=True):
    instance_id: str
    lines: list[str] = []
    # Bytes of the log read: a follower drops published lines whose LOG_OFFSET_HEADER is at or below it.
    offset: int = 0


class LogsReply(msgspec.Struct, kw_only=True):
    node: str
    logs: list[InstanceLog] = []


Digest = Annotated[str, msgspec.Meta(pattern=r"^(sha256:[0-9a-f]{64})?$")]


class ModelFetchRequest(msgspec.Struct, kw_only=True):
    """`magi.node.<node>.models.fetch`: put a model of the bus's model store into the node's cache, verified."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]+$", max_length=255)]
    digest: Digest = ""  # sha256:<hex>: exactly these bytes (refused when the store holds others); "": the latest


class ModelFetchReply(msgspec.Struct, kw_only=True):
    node: str
    name: str
    path: str  # the verified file on that node, `$MAGI_HOME/models/<hex>.gguf`
    digest: str
    size: int
    cached: bool = False  # already in the cache: nothing was downloaded
    fetch_ms: float = 0.0

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)]
Gb = Annotated[float, msgspec.Meta(ge=0)]


class InstanceSpec(msgspec.Struct, kw_only=True):
    """Seed 002's ExperimentInstance, plus what the node agent needs to run it."""

    instance_id: Name
    ram_gb: Gb
    gpu_required: bool = False
    gpu_preferred: bool = False
    gpu_memory_gb: Gb = 0.0
    # GPUs the instance holds exclusively (a vLLM worker holds one): a node takes no more of them than it has
    # (Heartbeat.gpus). 0: none, or not counted. An instance with gpus >= 1 needs a GPU node, gpu_required or not.
    gpus: Annotated[int, msgspec.Meta(ge=0)] = 0
    affinity: list[str] = []
    anti_affinity: list[str] = []
    preferred_node: str = ""
    group: str = ""  # a gang: every member is placed, or none
    experiment_config_path: str = ""
    model_size_gb: Gb = 0.0  # a model-serving coordinator: placed by the seed-001 RAM/GPU score
    # A replica of a model from the bus's model store: its digest (sha256:<hex>) and the download it costs a node
    # whose cache does not hold it. Such a node needs that much room (Heartbeat.model_room_gb); one holding the
    # digest is preferred.
    model_digest: str = ""
    download_gb: Gb = 0.0
    command: list[str] = []  # empty: a placement only, nothing for the agent to run
    env: dict[str, str] = {}
    cwd: str = ""
    restart: Literal["always", "on-failure", "never"] = "on-failure"


class PlaceRequest(msgspec.Struct, kw_only=True):
    """`magi.sched.place`: place (and have agents start) instances; `placement` pins some to nodes."""

    instances: Annotated[list[InstanceSpec], msgspec.Meta(min_length=1, max_length=100_000)]
    placement: dict[str, str] = {}


class PlaceReply(msgspec.Struct, kw_only=True):
    placements: dict[str, str]
    unplaced: dict[str, str]
    epoch: int
    # Proven: no placement within the hard constraints places more of the request (everything placed, or
    # the exact solver proved it). False: the solver's time budget ended first; the best found is used.
    optimal: bool = True
    score_optimal: bool = False  # proven too: no placement of that size scores better (the solver finished)
    method: Literal["greedy", "cp-sat"] = "greedy"  # cp-sat: greedy left something unplaced, the solver ran
    solve_ms: float = 0.0


class ReleaseRequest(msgspec.Struct, kw_only=True):
    """`magi.sched.release`: forget placements; their agents stop them within a heartbeat."""

    instance_ids: Annotated[list[str], msgspec.Meta(min_length=1)]


class ReleaseReply(msgspec.Struct, kw_only=True):
    released: list[str]
    unknown: list[str]
    epoch: int


class DrainRequest(msgspec.Struct, kw_only=True):
    """`magi.sched.drain`: MAINTENANCE on (no new placements, instances moved off) or off again."""

    node: Name
    drain: bool = True


class DrainReply(msgspec.Struct, kw_only=True):
    node: str
    status: str
    moved: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    epoch: int = 0


class RebalanceRequest(msgspec.Struct, kw_only=True):
    """`magi.sched.rebalance`: a placement that places more or scores better by moving running instances.

    With `dry_run` nothing changes; otherwise the moves are applied one at a time, each new copy running
    before the old one stops."""

    dry_run: bool = True
    budget_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 2.0  # the solver's wall-clock budget


class Move(msgspec.Struct, kw_only=True):
    instance_id: str
    from_node: str  # "": a pending instance started where it now fits
    to_node: str
    score_gain: float = 0.0  # seed-002 points this instance gains on its new node


class RebalanceReply(msgspec.Struct, kw_only=True):
    moves: list[Move]  # in the order they are (or would be) applied
    placed_before: int
    placed_after: int
    score_before: float  # the seed-002 score summed over placed instances
    score_after: float
    optimal: bool = False  # the solver proved no placement does better
    dry_run: bool = True
    applied: list[str] = []  # instance ids moved (not a dry run)
    failed: dict[str, str] = {}  # instance id -> why its move did not happen (applying stops at the first)
    epoch: int = 0


class AssignmentsRequest(msgspec.Struct, kw_only=True):
    """`magi.sched.assignments.<node>`: what a node's agent should be running now (only that node's agent may ask)."""

    node: Name


class AssignmentsReply(msgspec.Struct, kw_only=True):
    node: str
    epoch: int
    instances: list[InstanceSpec]


class PlacementRecord(msgspec.Struct, kw_only=True):
    """What the scheduler keeps per instance (in Redis): where it runs and since which epoch."""

    spec: InstanceSpec
    node: str  # "" while pending: its node failed and no other node fits yet
    epoch: int
    state: Literal["placed", "pending", "crashloop", "refused"] = "placed"
    reason: str = ""
    # A rebalance move in progress: the old copy keeps running here until the new one runs on `node`.
    moving_from: str = ""

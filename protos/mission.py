from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from protos.consensus import Strategy
from protos.memory import Namespace, SearchHit

# JetStream: missions published to SUBMIT_SUBJECT (a work queue), results stored under RESULT_PREFIX.<id>,
# missions that kept failing under DEAD_PREFIX.<id>.
SUBMIT_STREAM, SUBMIT_SUBJECT = "MAGI_MISSIONS", "magi.mission.submit"
RESULT_STREAM, RESULT_PREFIX = "MAGI_MISSION_RESULTS", "magi.mission.result"
DEAD_STREAM, DEAD_PREFIX = "MAGI_MISSIONS_DEAD", "magi.mission.dead"

# A mission id is one subject token: it names the result subject and de-duplicates re-submissions.
MissionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

class MissionRequest(msgspec.Struct, kw_only=True):
    """`magi.mission.run`: the seed-000 mission keys plus consensus strategy and deadline."""

    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=16384)]
    needs_deep_analysis: bool = False  # with no variations either, one deep clone still runs
    variations: Annotated[list[str], msgspec.Meta(max_length=32)] = []
    context_needed: bool = False
    embedding: list[float] | None = None
    # synthesize: the heavy model merges the agreeing answers into one, citing clone ids (see the README).
    consensus: Strategy = "synthesize"
    deadline_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 120.0
    # Each clone's budget. 0: the role's default, seed 000's (2000 tokens for deep analysis, 200 for a
    # variation) scaled down to the serving model's context window (512 and 128 for a 2048-token model).
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    # The deep clone's own budget; 0: `max_tokens` when given, else the heavy role's default.
    deep_max_tokens: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    # "style": each variation shapes the answer to `prompt` ("Answer in one line."); "prompt": each variation
    # is a question of its own, asked with the same memory context.
    variations_mode: Literal["style", "prompt"] = "style"
    namespace: Namespace = "default"
    k: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    # Each clone's result is published here (a `CloneResult`) as soon as it finishes, for progress.
    progress_subject: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_$.-]*$", max_length=256)] = ""
    # The caller's name for this mission (an idempotency key): sending it again, by either entry point,
    # never runs it twice; its result is `magi.mission.result.<id>` / `magi.mission.get`. Empty: one is made.
    mission_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""


class MissionGet(msgspec.Struct, kw_only=True):
    """`magi.mission.get`: the stored result of a mission (its reply, or the error it ended with)."""

    mission_id: MissionId


class DeadLetter(msgspec.Struct, kw_only=True):
    """Published on `magi.mission.dead.<id>` when a mission failed on every one of its attempts."""

    mission_id: str
    attempts: int
    code: int
    error: str
    mission: bytes = b""  # the mission as it was submitted (base64 in JSON)


class CloneResult(msgspec.Struct, kw_only=True):
    clone_id: str
    role: str
    variation: str = ""
    model: str = ""
    node: str = ""
    replica: str = ""
    latency_ms: float = 0.0
    ok: bool = False
    text: str = ""
    error: str | None = None
    completion_tokens: int = 0
    context_ids: list[str] = []  # the memory hits this clone's prompt carried
    engine_ms: float = 0.0  # of latency_ms, the time its replica spent inside the engine (GenerateReply.engine_ms)


class ConsensusSummary(msgspec.Struct, kw_only=True):
    id: str
    answer: str
    strategy: str
    agreement: float
    votes: int
    winner: str = ""
    similarity: str = ""  # "embedding" or "words": how answers were compared (see ConsensusRecord)
    cited: list[str] = []  # `synthesize`: the clone ids the written answer cites


class Timings(msgspec.Struct, kw_only=True):
    """Where a mission's time went, in milliseconds, measured by the orchestrator running it.

    Stages run one after another: memory (search for context), plan (budgets, clone prompts, the `started`
    event), clones (all in parallel), consensus (`magi.consensus.decide`), remember (the answer into memory).
    Each `*_engine_ms` is the part of its stage spent inside engines, as the services report it: the query's
    embedding; the engine time of the clone that finished last (clones run side by side, so that one is the
    critical path); consensus's embeddings and synthesis; the answer's embedding. `engine_ms` is their sum
    and `overhead_ms` = total_ms - engine_ms: bus hops, routing, databases, bookkeeping. `total_ms` runs from
    the orchestrator taking the mission to its reply, so the queue before that is not in it.
    """

    total_ms: float
    memory_ms: float = 0.0
    clones_ms: float = 0.0
    consensus_ms: float = 0.0  # the decision alone; remembering the answer is remember_ms
    plan_ms: float = 0.0
    remember_ms: float = 0.0
    memory_engine_ms: float = 0.0
    clones_engine_ms: float = 0.0
    consensus_engine_ms: float = 0.0
    remember_engine_ms: float = 0.0
    engine_ms: float = 0.0
    overhead_ms: float = 0.0


class MissionReply(msgspec.Struct, kw_only=True):
    mission_id: str
    consensus: ConsensusSummary
    clones: list[CloneResult]
    context: list[SearchHit]
    timings: Timings
    trace_id: str = ""


# Each mission's lifecycle, published (core NATS, fire-and-forget) on EVENTS_PREFIX.<mission_id> by the
# orchestrator running it: started, one `clone` per clone as it finishes, then `decided` or `failed`.
# A mission retried after a failed attempt starts again with a new `started`. For watchers (the
# gateway's dashboard): nothing depends on them, and a watcher that was away reads results with
# `magi.mission.get`. Texts are excerpts, so an event stays small whatever the models wrote.
EVENTS_PREFIX = "magi.mission.events"
EXCERPT_CHARS = 600  # a clone's answer in its `clone` event
ANSWER_CHARS = 4000  # the consensus answer in `decided`


class PlannedClone(msgspec.Struct, kw_only=True):
    clone_id: str = ""
    role: str = ""
    variation: str = ""


class MissionStarted(msgspec.Struct, kw_only=True, tag="started"):
    mission_id: str = ""
    at: float = 0.0  # the orchestrator's wall clock (seconds since the epoch)
    prompt: str = ""  # the mission's prompt, its first ANSWER_CHARS characters
    strategy: str = ""
    clones: list[PlannedClone] = []


class MissionClone(msgspec.Struct, kw_only=True, tag="clone"):
    mission_id: str = ""
    at: float = 0.0
    clone_id: str = ""
    role: str = ""
    variation: str = ""
    model: str = ""
    node: str = ""
    replica: str = ""
    latency_ms: float = 0.0
    ok: bool = False
    text: str = ""  # the first EXCERPT_CHARS characters of the clone's answer
    error: str = ""
    completion_tokens: int = 0


class MissionDecided(msgspec.Struct, kw_only=True, tag="decided"):
    mission_id: str = ""
    at: float = 0.0
    consensus_id: str = ""
    strategy: str = ""
    answer: str = ""  # the first ANSWER_CHARS characters
    agreement: float = 0.0
    votes: int = 0
    winner: str = ""
    cited: list[str] = []
    total_ms: float = 0.0


class MissionFailed(msgspec.Struct, kw_only=True, tag="failed"):
    """This attempt failed; a mission failing with a 5xx may be retried (a new `started` follows)."""

    mission_id: str = ""
    at: float = 0.0
    code: int = 0
    error: str = ""


MissionEvent = MissionStarted | MissionClone | MissionDecided | MissionFailed

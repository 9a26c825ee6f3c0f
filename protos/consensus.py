from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# synthesize: the heavy model writes one answer from the winning group's answers, citing clone ids.
Strategy = Literal["synthesize", "medoid", "majority", "longest"]


class Vote(msgspec.Struct, kw_only=True):
    clone_id: str
    text: str
    role: str = ""
    model: str = ""
    node: str = ""
    ok: bool = True
    latency_ms: float = 0.0  # how long the clone took (the mission graph keeps it per vote)


class DecideRequest(msgspec.Struct, kw_only=True):
    """`magi.consensus.decide`: merge clone answers into one, stored with every vote."""

    votes: Annotated[list[Vote], msgspec.Meta(min_length=1, max_length=512)]
    strategy: Strategy = "medoid"
    mission_id: str = ""
    # The question the votes answer: `synthesize` writes its answer to it, and the mission graph keeps it so
    # `magi.consensus.history` can find earlier missions like a new prompt.
    prompt: Annotated[str, msgspec.Meta(max_length=16384)] = ""
    # The synthesized answer's budget (`synthesize` only); 0: the service's default.
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    # How long the caller will wait, in seconds (a mission passes what is left of its deadline); 0: the
    # service's default. `synthesize` falls back to the medoid rather than answer after the caller gave up.
    timeout_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0


class Synthesis(msgspec.Struct, kw_only=True):
    """How a `synthesize` answer was made: from which votes, by which model, citing which clones."""

    inputs: list[str]  # the clone ids whose answers the model was given (the winning group)
    cited: list[str] = []  # the clone ids the written answer cites, each one of `inputs`
    model: str = ""
    node: str = ""
    latency_ms: float = 0.0
    # How `cited` was found: "model" (the model named the ids), "attributed" (each sentence of the answer
    # credited to the input it is closest to in meaning, when the model named none), or "" (fallback).
    citation: str = ""
    # Why the answer is not a synthesis after all (empty when it is): e.g. no heavy model answered; the
    # record's answer is then the group's medoid.
    fallback: str = ""


class ConsensusRecord(msgspec.Struct, kw_only=True):
    id: str
    answer: str
    strategy: str
    agreement: float
    winner: str
    votes: list[Vote]
    groups: list[list[str]] = []
    mission_id: str = ""
    created_at: str = ""
    copies: int = 1  # records stored for this mission id (a lookup by mission_id says; 1 unless duplicated)
    # How answers were compared: "embedding" (by meaning, the embedding model's vectors) or "words" (token
    # overlap: the fallback when no embedding model answered).
    similarity: str = "words"
    prompt: str = ""
    synthesis: Synthesis | None = None  # set when the answer was written by `synthesize`
    # Milliseconds the engines spent for this decision (embedding the answers, writing and embedding a synthesis),
    # one call after another. Set on `magi.consensus.decide`'s reply only; not stored (0 when read back).
    engine_ms: float = 0.0


class GetRequest(msgspec.Struct, kw_only=True):
    """`magi.consensus.get`: read a stored consensus record back by its id, or by its mission's id."""

    id: Annotated[str, msgspec.Meta(max_length=200)] = ""
    mission_id: Annotated[str, msgspec.Meta(max_length=64)] = ""


class HistoryRequest(msgspec.Struct, kw_only=True):
    """`magi.consensus.history`: the mission graph, asked one of two ways (give exactly one).

    - `prompt`: earlier missions whose prompts are like this one (by embedding; by words without an embedder).
    - `node`: what the clones that ran on this node contributed, vote by vote, with a summary.
    """

    prompt: Annotated[str, msgspec.Meta(max_length=16384)] = ""
    node: Annotated[str, msgspec.Meta(max_length=200)] = ""
    # How many similar missions (by prompt), or the node's latest votes (by node), to list.
    k: Annotated[int, msgspec.Meta(ge=1, le=200)] = 5


class PastMission(msgspec.Struct, kw_only=True):
    mission_id: str = ""
    consensus_id: str = ""  # consensus:<key>, readable with magi.consensus.get
    prompt: str = ""
    answer: str = ""
    strategy: str = ""
    agreement: float = 0.0
    created_at: str = ""
    score: float = 0.0  # cosine of the prompts' embeddings, or word overlap (Jaccard) when `similarity` is "words"


class Contribution(msgspec.Struct, kw_only=True):
    """One vote a clone on the node cast in one mission."""

    mission_id: str = ""
    consensus_id: str = ""
    clone_id: str = ""
    role: str = ""
    model: str = ""
    latency_ms: float = 0.0
    ok: bool = True
    chosen: bool = False  # in the group the consensus chose from (a synthesis's inputs, else the winner's group)
    cited: bool = False  # cited by the synthesized answer
    text: str = ""  # the vote's answer, its first 300 characters
    created_at: str = ""


class NodeSummary(msgspec.Struct, kw_only=True):
    """Every vote cast on the node (not only the listed ones)."""

    votes: int = 0
    ok: int = 0
    chosen: int = 0
    cited: int = 0
    mean_latency_ms: float = 0.0


class HistoryReply(msgspec.Struct, kw_only=True):
    # By prompt: how prompts were compared, "embedding" or "words" (no embedding model answered); "" by node.
    similarity: str = ""
    similar: list[PastMission] = []  # best first
    node: str = ""
    contributions: list[Contribution] = []  # newest first
    summary: NodeSummary = msgspec.field(default_factory=NodeSummary)

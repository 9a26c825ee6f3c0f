from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Strategy = Literal["medoid", "majority", "longest"]


class Vote(msgspec.Struct, kw_only=True):
    clone_id: str
    text: str
    role: str = ""
    model: str = ""
    node: str = ""
    ok: bool = True


class DecideRequest(msgspec.Struct, kw_only=True):
    """`magi.consensus.decide`: merge clone answers into one, stored with every vote."""

    votes: Annotated[list[Vote], msgspec.Meta(min_length=1, max_length=512)]
    strategy: Strategy = "medoid"
    mission_id: str = ""


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


class GetRequest(msgspec.Struct, kw_only=True):
    """`magi.consensus.get`: read a stored consensus record back by its id, or by its mission's id."""

    id: Annotated[str, msgspec.Meta(max_length=200)] = ""
    mission_id: Annotated[str, msgspec.Meta(max_length=64)] = ""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Namespace = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class MemoryDoc(msgspec.Struct, kw_only=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=32768)]
    id: str | None = None  # default: a content hash, so re-upserting the same text is idempotent
    namespace: Namespace = "default"
    metadata: dict[str, Any] = {}


class UpsertRequest(msgspec.Struct, kw_only=True):
    """`magi.memory.upsert`: embed and store documents (insert or replace by id)."""

    documents: Annotated[list[MemoryDoc], msgspec.Meta(min_length=1, max_length=256)]


class UpsertReply(msgspec.Struct, kw_only=True):
    ids: list[str]
    count: int


class SearchRequest(msgspec.Struct, kw_only=True):
    """`magi.memory.search`: nearest documents by cosine similarity to `text` or `embedding`."""

    text: str | None = None
    embedding: list[float] | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    namespace: Namespace = "default"


class SearchHit(msgspec.Struct, kw_only=True):
    id: str
    text: str
    score: float
    namespace: str
    metadata: dict[str, Any] = {}


class SearchReply(msgspec.Struct, kw_only=True):
    hits: list[SearchHit]
    dim: int = 0

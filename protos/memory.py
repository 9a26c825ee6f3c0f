from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

Namespace = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
# A JSON object matched against stored metadata with jsonb containment (`metadata @> filter`): every key given
# must be there with that value ({"host": "nas"}; nested objects and arrays match by containment too).
MetadataFilter = dict[str, Any]
SearchMode = Literal["vector", "text", "hybrid"]


class MemoryDoc(msgspec.Struct, kw_only=True):
    # Longer than the embedding model's window: stored as overlapping chunks (see services/memory/chunking.py).
    # The request as a whole stays under MAGI_MAX_PAYLOAD (256 KiB by default).
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=200_000)]
    id: str | None = None  # default: a content hash, so re-upserting the same text is idempotent
    namespace: Namespace = "default"
    metadata: dict[str, Any] = {}


class UpsertRequest(msgspec.Struct, kw_only=True):
    """`magi.memory.upsert`: embed and store documents (insert or replace by id, all their chunks)."""

    documents: Annotated[list[MemoryDoc], msgspec.Meta(min_length=1, max_length=256)]


class UpsertReply(msgspec.Struct, kw_only=True):
    ids: list[str]
    count: int
    chunks: list[int] = []  # chunks stored per document, in order
    embed_ms: float = 0.0  # milliseconds the embedding engine spent on these documents' chunks (EmbedReply.engine_ms)


class SearchRequest(msgspec.Struct, kw_only=True):
    """`magi.memory.search`: the best `k` documents for `text` (or `embedding`), one chunk each.

    `mode`: `vector` (cosine similarity of embeddings), `text` (PostgreSQL full-text search; needs `text`), or
    `hybrid` (both, fused by weighted reciprocal rank; with only an `embedding` it is `vector`).
    """

    text: str | None = None
    embedding: list[float] | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    namespace: Namespace = "default"
    mode: SearchMode = "hybrid"
    filter: MetadataFilter = {}


class SearchHit(msgspec.Struct, kw_only=True):
    id: str  # the chunk's id: the document's id for its first (or only) chunk, `<document id>#<chunk>` after
    text: str  # the chunk's text
    score: float  # the mode's own: cosine similarity, ts_rank_cd, or the fused reciprocal-rank score
    namespace: str
    metadata: dict[str, Any] = {}
    parent_id: str = ""  # the document's id
    chunk: int = 0
    chunks: int = 1  # how many chunks the document has
    vector_score: float | None = None  # cosine similarity, where the vector side ranked this document
    text_score: float | None = None  # ts_rank_cd, where the text side ranked it
    vector_rank: int | None = None  # hybrid: 1-based rank on each side (None: not in that side's candidates)
    text_rank: int | None = None


class SearchReply(msgspec.Struct, kw_only=True):
    hits: list[SearchHit]
    dim: int = 0
    mode: str = ""  # the mode that ranked the hits
    embed_ms: float = 0.0  # milliseconds the embedding engine spent on the query's vector (0: none was made)


class ListRequest(msgspec.Struct, kw_only=True):
    """`magi.memory.list`: documents in a namespace, in id order, a page at a time."""

    namespace: Namespace = "default"
    filter: MetadataFilter = {}
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    cursor: str | None = None  # the previous page's `next_cursor`
    max_chars: Annotated[int, msgspec.Meta(ge=0, le=20_000)] = 500  # text is cut to this many characters


class ListedDoc(msgspec.Struct, kw_only=True):
    id: str
    namespace: str
    text: str  # the start of the document (its first chunk, cut to max_chars)
    truncated: bool = False  # more text is stored than shown
    metadata: dict[str, Any] = {}
    created_at: datetime | None = None
    chunks: int = 1


class ListReply(msgspec.Struct, kw_only=True):
    documents: list[ListedDoc]
    next_cursor: str | None = None  # None: this was the last page


class DeleteRequest(msgspec.Struct, kw_only=True):
    """`magi.memory.delete`: documents (every chunk) in `namespace` by `ids` and/or metadata `filter`.

    With neither, nothing is deleted unless `all` is true: then every document in the namespace is.
    """

    ids: Annotated[list[str], msgspec.Meta(max_length=1000)] = []
    namespace: Namespace = "default"
    filter: MetadataFilter = {}
    all: bool = False


class DeleteReply(msgspec.Struct, kw_only=True):
    deleted: int  # documents
    chunks: int = 0  # rows (chunks) removed with them

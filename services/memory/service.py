"""`magi.memory.upsert` / `.search` / `.list` / `.delete`: embeddings come from the inference service's embed model."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nats.aio.client import Client

from protos.infer import EmbedReply, EmbedRequest
from protos.memory import (
    DeleteReply,
    DeleteRequest,
    ListedDoc,
    ListReply,
    ListRequest,
    SearchReply,
    SearchRequest,
    UpsertReply,
    UpsertRequest,
)
from services.memory.chunking import chunk_text, halve
from services.memory.store import Document, MemoryStore, doc_id
from shared import bus
from shared.config import Settings
from shared.errors import BadRequest, Unavailable
from shared.service import MagiService, RequestContext

VERSION = "0.2.0"

# Texts per `magi.infer.embed` call: a 384-d vector is ~8 KB of JSON, so 32 keep each reply near 256 KiB, far
# under the bus's 1 MB message limit, and each call short on a small CPU.
EMBED_BATCH = 32
MAX_HALVINGS = 6  # a chunk the model still refuses after this many halvings is an error
_TOO_LONG = re.compile(r"texts\[(\d+)\] is \d+ tokens")


@dataclass
class EngineTime:
    """Milliseconds the embedding engine spent for one request, over however many embed calls it made."""

    ms: float = 0.0


class Embedder:
    """Asks `magi.infer.embed`; a real model, never a hash or random projection."""

    def __init__(self, nc: Client, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout

    async def embed(self, texts: list[str], spent: EngineTime | None = None) -> list[list[float]]:
        """The texts' vectors; the engine's time for them is added to `spent`, when given."""
        reply = await self.embed_reply(texts)
        if spent is not None:
            spent.ms += reply.engine_ms
        return reply.vectors

    async def embed_reply(self, texts: list[str]) -> EmbedReply:
        return await bus.request(self.nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=self.timeout)

    async def embed_fitting(self, items: list[tuple[int, str]], spent: EngineTime,
                            halvings: int = 0) -> list[tuple[int, str, list[float]]]:
        """Embed (tag, text) items in batches; a text the model refuses as too long is halved and both halves
        embedded (same tag), so the result may hold more items than were given, in order. The engine's time
        is added to `spent`."""
        out: list[tuple[int, str, list[float]]] = []
        for start in range(0, len(items), EMBED_BATCH):
            batch = items[start:start + EMBED_BATCH]
            try:
                vectors = await self.embed([text for _, text in batch], spent)
            except BadRequest as exc:
                long = _TOO_LONG.search(exc.message)
                if long is None or halvings >= MAX_HALVINGS:
                    raise
                i = int(long.group(1))
                tag, text = batch[i]
                out += await self.embed_fitting(batch[:i], spent, halvings)
                out += await self.embed_fitting([(tag, part) for part in halve(text)], spent, halvings + 1)
                out += await self.embed_fitting(batch[i + 1:], spent, halvings)
                continue
            out += [(tag, text, vector) for (tag, text), vector in zip(batch, vectors)]
        return out


class MemoryEndpoints:
    def __init__(self, store: MemoryStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder

    async def upsert(self, req: UpsertRequest, ctx: RequestContext) -> UpsertReply:
        items: list[tuple[int, str]] = []
        for n, d in enumerate(req.documents):
            if "\x00" in d.text:
                raise BadRequest("text may not contain NUL characters", field=f"documents[{n}].text")
            items += [(n, chunk) for chunk in chunk_text(d.text)]
        spent = EngineTime()
        embedded = await self.embedder.embed_fitting(items, spent)
        documents = [Document(id=d.id or doc_id(d.namespace, d.text), namespace=d.namespace, metadata=d.metadata,
                              chunks=[]) for d in req.documents]
        for n, text, vector in embedded:
            documents[n].chunks.append((text, vector))
        await self.store.upsert(documents)
        return UpsertReply(ids=[d.id for d in documents], count=len(documents),
                           chunks=[len(d.chunks) for d in documents], embed_ms=round(spent.ms, 2))

    async def search(self, req: SearchRequest, ctx: RequestContext) -> SearchReply:
        vector, spent = None, EngineTime()
        if req.mode == "text":
            if not req.text:
                raise BadRequest("text search needs `text`", field="text")
        elif req.embedding is not None:
            self.store.check_dim(req.embedding, "embedding")
            vector = req.embedding
        elif req.text:
            try:
                vector = (await self.embedder.embed([req.text], spent))[0]
            except BadRequest as exc:  # e.g. longer than the embedding model takes
                raise BadRequest(exc.message, field="text") from None
        else:
            raise BadRequest("give `text` or `embedding` to search by", field="text")
        mode = req.mode if req.text else "vector"
        hits = await self.store.search(namespace=req.namespace, k=req.k, vector=vector, text=req.text, mode=mode,
                                       filter=req.filter)
        return SearchReply(hits=hits, dim=self.store.dim, mode=mode, embed_ms=round(spent.ms, 2))

    async def list(self, req: ListRequest, ctx: RequestContext) -> ListReply:
        rows, cursor = await self.store.list(req.namespace, req.filter, req.limit, req.cursor, req.max_chars)
        docs = [ListedDoc(id=r["id"], namespace=r["namespace"], text=r["text"], metadata=r["metadata"],
                          truncated=r["chunks"] > 1 or r["length"] > len(r["text"]), created_at=r["created_at"],
                          chunks=r["chunks"]) for r in rows]
        return ListReply(documents=docs, next_cursor=cursor)

    async def delete(self, req: DeleteRequest, ctx: RequestContext) -> DeleteReply:
        if not req.ids and not req.filter and not req.all:
            raise BadRequest(f"this would delete every document in namespace {req.namespace!r}: give `ids` or "
                             "`filter`, or `all: true` to mean it", field="all")
        documents, chunks = await self.store.delete(req.namespace, req.ids, req.filter)
        return DeleteReply(deleted=documents, chunks=chunks)


async def _embedding_model(embedder: Embedder) -> tuple[str, int]:
    try:
        reply = await embedder.embed_reply(["dimension probe"])
        return reply.model, len(reply.vectors[0])
    except Unavailable as exc:
        raise Unavailable(f"memory needs the inference service's embed model: {exc.message}") from None


async def build(settings: Settings):
    service = MagiService("magi-memory", VERSION, "Hybrid (vector + full-text) memory on PostgreSQL + pgvector",
                          settings)
    nc = await service.connect()
    embedder = Embedder(nc, timeout=settings.request_timeout_s)
    model, dim = await _embedding_model(embedder)
    store = await MemoryStore.open(settings.pg_dsn, dim, model, embedder.embed)
    endpoints = MemoryEndpoints(store, embedder)
    service.endpoint("magi.memory.upsert", UpsertRequest, endpoints.upsert)
    service.endpoint("magi.memory.search", SearchRequest, endpoints.search)
    service.endpoint("magi.memory.list", ListRequest, endpoints.list)
    service.endpoint("magi.memory.delete", DeleteRequest, endpoints.delete)
    return service, store.close

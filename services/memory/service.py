"""`magi.memory.upsert` / `magi.memory.search`: embeddings come from the inference service's embed model."""

from __future__ import annotations

from nats.aio.client import Client

from protos.infer import EmbedReply, EmbedRequest
from protos.memory import SearchReply, SearchRequest, UpsertReply, UpsertRequest
from services.memory.store import MemoryStore, doc_id
from shared import bus
from shared.config import Settings
from shared.errors import BadRequest, Unavailable
from shared.service import MagiService, RequestContext

VERSION = "0.1.0"


class Embedder:
    """Asks `magi.infer.embed`; a real model, never a hash or random projection."""

    def __init__(self, nc: Client, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return (await self.embed_reply(texts)).vectors

    async def embed_reply(self, texts: list[str]) -> EmbedReply:
        return await bus.request(self.nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=self.timeout)


class MemoryEndpoints:
    def __init__(self, store: MemoryStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder

    async def upsert(self, req: UpsertRequest, ctx: RequestContext) -> UpsertReply:
        vectors = await self.embedder.embed([d.text for d in req.documents])
        rows = [
            (d.id or doc_id(d.namespace, d.text), d.namespace, d.text, d.metadata, vec)
            for d, vec in zip(req.documents, vectors)
        ]
        await self.store.upsert(rows)
        return UpsertReply(ids=[r[0] for r in rows], count=len(rows))

    async def search(self, req: SearchRequest, ctx: RequestContext) -> SearchReply:
        if req.embedding is not None:
            self.store.check_dim(req.embedding, "embedding")
            vector = req.embedding
        elif req.text:
            vector = (await self.embedder.embed([req.text]))[0]
        else:
            raise BadRequest("give `text` or `embedding` to search by", field="text")
        hits = await self.store.search(vector, req.namespace, req.k)
        return SearchReply(hits=hits, dim=self.store.dim)


async def _embedding_model(embedder: Embedder) -> tuple[str, int]:
    try:
        reply = await embedder.embed_reply(["dimension probe"])
        return reply.model, len(reply.vectors[0])
    except Unavailable as exc:
        raise Unavailable(f"memory needs the inference service's embed model: {exc.message}") from None


async def build(settings: Settings):
    service = MagiService("magi-memory", VERSION, "Vector memory on PostgreSQL + pgvector", settings)
    nc = await service.connect()
    embedder = Embedder(nc, timeout=settings.request_timeout_s)
    model, dim = await _embedding_model(embedder)
    store = await MemoryStore.open(settings.pg_dsn, dim, model, embedder.embed)
    endpoints = MemoryEndpoints(store, embedder)
    service.endpoint("magi.memory.upsert", UpsertRequest, endpoints.upsert)
    service.endpoint("magi.memory.search", SearchRequest, endpoints.search)
    return service, store.close

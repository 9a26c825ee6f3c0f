"""pgvector storage. Vectors travel as text literals ('[0.1,0.2]') so no numpy codec is needed."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Awaitable, Callable

import asyncpg

from protos.memory import SearchHit
from shared.errors import BadRequest, Unavailable

log = logging.getLogger("magi.memory.store")

TABLE = "memory_entities"


def doc_id(namespace: str, text: str) -> str:
    """Content hash: the same text upserted twice in a namespace is one document."""
    return hashlib.sha256(f"{namespace}\x00{text}".encode()).hexdigest()[:24]


def vector_literal(vector: list[float]) -> str:
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


META = "memory_meta"  # which embedding model made the stored vectors
REEMBED_BATCH = 32

Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


class MemoryStore:
    def __init__(self, pool: asyncpg.Pool, dim: int) -> None:
        self.pool = pool
        self.dim = dim

    @classmethod
    async def open(cls, dsn: str, dim: int, model: str = "", embed: Embed | None = None) -> "MemoryStore":
        """`model` names the embedding model; stored vectors made by another one are re-embedded with `embed`."""
        if not dsn:
            raise Unavailable("no PostgreSQL configured: set MAGI_PG_DSN (magi up sets it for the local stack)")
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8, command_timeout=300)
        store = cls(pool, dim)
        await store._migrate(model, embed)
        return store

    async def _migrate(self, model: str = "", embed: Embed | None = None) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {TABLE} (
                    id text PRIMARY KEY,
                    namespace text NOT NULL,
                    text text NOT NULL,
                    metadata jsonb NOT NULL DEFAULT '{{}}',
                    embedding vector({self.dim}) NOT NULL,
                    created_at timestamptz NOT NULL DEFAULT now())"""
            )
            existing = await conn.fetchval(
                "SELECT atttypmod FROM pg_attribute WHERE attrelid = $1::regclass AND attname = 'embedding'", TABLE
            )
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {META} (key text PRIMARY KEY, value text NOT NULL)")
            stored_model = await conn.fetchval(f"SELECT value FROM {META} WHERE key = 'embed_model'")
            if existing != self.dim or (model and stored_model not in (None, model)):
                if embed is None:
                    raise Unavailable(
                        f"{TABLE}.embedding has {existing} dimensions from model {stored_model or 'unknown'} but the "
                        f"embedding model {model or ''} gives {self.dim}; re-embed or configure the matching model")
                await self._reembed(conn, existing, stored_model, model, embed)
            if model:
                await conn.execute(f"INSERT INTO {META} VALUES ('embed_model', $1) ON CONFLICT (key) DO UPDATE "
                                   "SET value = excluded.value", model)
            await conn.execute(
                f"CREATE INDEX IF NOT EXISTS {TABLE}_hnsw ON {TABLE} USING hnsw (embedding vector_cosine_ops)"
            )
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_ns ON {TABLE} (namespace)")

    async def _reembed(self, conn, old_dim: int, old_model: str | None, model: str, embed: Embed) -> None:
        """A new embedding model: every stored text gets its vector again, in one transaction (all or none)."""
        rows = await conn.fetch(f"SELECT id, text FROM {TABLE} ORDER BY id")
        log.warning("embedding model changed; re-embedding stored memory",
                    extra={"documents": len(rows), "from_model": old_model, "from_dim": old_dim, "to_model": model,
                           "to_dim": self.dim})
        async with conn.transaction():
            await conn.execute(f"DROP INDEX IF EXISTS {TABLE}_hnsw")
            await conn.execute(f"ALTER TABLE {TABLE} DROP COLUMN embedding")
            await conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN embedding vector({self.dim})")
            for start in range(0, len(rows), REEMBED_BATCH):
                batch = rows[start:start + REEMBED_BATCH]
                vectors = await embed([r["text"] for r in batch])
                await conn.executemany(f"UPDATE {TABLE} SET embedding = $2::vector WHERE id = $1",
                                       [(r["id"], vector_literal(v)) for r, v in zip(batch, vectors)])
            await conn.execute(f"ALTER TABLE {TABLE} ALTER COLUMN embedding SET NOT NULL")

    def check_dim(self, vector: list[float], field: str) -> None:
        if len(vector) != self.dim:
            raise BadRequest(f"embedding has {len(vector)} dimensions, expected {self.dim}", field=field)

    async def upsert(self, rows: list[tuple[str, str, str, dict, list[float]]]) -> None:
        """rows: (id, namespace, text, metadata, embedding), written in one transaction."""
        records = [(i, ns, text, json.dumps(meta), vector_literal(vec)) for i, ns, text, meta, vec in rows]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                f"""INSERT INTO {TABLE} (id, namespace, text, metadata, embedding)
                    VALUES ($1, $2, $3, $4::jsonb, $5::vector)
                    ON CONFLICT (id) DO UPDATE SET namespace = EXCLUDED.namespace, text = EXCLUDED.text,
                        metadata = EXCLUDED.metadata, embedding = EXCLUDED.embedding""",
                records,
            )

    async def search(self, vector: list[float], namespace: str, k: int) -> list[SearchHit]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT id, namespace, text, metadata::text AS metadata, 1 - (embedding <=> $1::vector) AS score
                    FROM {TABLE} WHERE namespace = $2 ORDER BY embedding <=> $1::vector LIMIT $3""",
                vector_literal(vector), namespace, k,
            )
        return [
            SearchHit(id=r["id"], text=r["text"], score=round(float(r["score"]), 6), namespace=r["namespace"],
                      metadata=json.loads(r["metadata"]))
            for r in rows
        ]

    async def close(self) -> None:
        await self.pool.close()

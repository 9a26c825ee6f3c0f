"""pgvector storage. Vectors travel as text literals ('[0.1,0.2]') so no numpy codec is needed."""

from __future__ import annotations

import hashlib
import json
import logging

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


class MemoryStore:
    def __init__(self, pool: asyncpg.Pool, dim: int) -> None:
        self.pool = pool
        self.dim = dim

    @classmethod
    async def open(cls, dsn: str, dim: int) -> "MemoryStore":
        if not dsn:
            raise Unavailable("no PostgreSQL configured: set MAGI_PG_DSN (magi up sets it for the local stack)")
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8, command_timeout=30)
        store = cls(pool, dim)
        await store._migrate()
        return store

    async def _migrate(self) -> None:
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
            if existing != self.dim:
                raise Unavailable(
                    f"{TABLE}.embedding has {existing} dimensions but the embedding model gives {self.dim}; "
                    "re-embed into a new database or configure the matching model"
                )
            await conn.execute(
                f"CREATE INDEX IF NOT EXISTS {TABLE}_hnsw ON {TABLE} USING hnsw (embedding vector_cosine_ops)"
            )
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_ns ON {TABLE} (namespace)")

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

"""Memory: retrieval quality per search mode on a labelled home-lab set, and search at 100k documents.

Quality (`measure_memory_recall`, through `magi.memory.search`): benchmarks/data/memory_eval.json, each question
with exactly one relevant document. Half are paraphrases that share few words with it, half name a rare token
(a port, serial, path, VLAN id): the split shows where dense embeddings do well and where they miss exact tokens.
The unsuffixed metrics are the default mode's (what callers get); `.vector`, `.text`, `.hybrid` each mode's.

Scale (`measure_memory_scale`, MemoryStore's own code path against the bench stack's PostgreSQL, in a database of
its own that is dropped afterwards): 100,000 random 384-d unit vectors with random words as text, bulk-loaded
with COPY (binary pgvector) and indexed afterwards; top-10 hybrid search latency, and the overlap of the HNSW
top-10 with an exact scan (numpy) at the store's own ef_search.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np

from magi import stack
from protos.memory import MemoryDoc, SearchReply, SearchRequest, UpsertReply, UpsertRequest
from shared import bus

DATA = Path(__file__).resolve().parent / "data" / "memory_eval.json"
NAMESPACE = "eval"  # kept apart from any real memories in the stack
K = 10
BATCH = 32  # documents per upsert: one embed call each, well under the request timeout on a small CPU
TIMEOUT = 120.0
MODES = ("vector", "text", "hybrid")


def _search_request(text: str, mode: str | None = None) -> SearchRequest:
    # No mode given: the request keeps the proto's default search mode, which is what callers get and so what
    # the unsuffixed metrics track.
    if mode is None:
        return SearchRequest(text=text, k=K, namespace=NAMESPACE)
    return SearchRequest(text=text, k=K, namespace=NAMESPACE, mode=mode)


async def upsert_documents(nc, documents: list[dict], namespace: str = NAMESPACE) -> None:
    """The labelled set's documents (`{"id", "text"}`) into `namespace`, BATCH per upsert."""
    for start in range(0, len(documents), BATCH):
        docs = [MemoryDoc(id=d["id"], text=d["text"], namespace=namespace) for d in documents[start:start + BATCH]]
        await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=docs), UpsertReply, timeout=TIMEOUT)


async def _rank(nc, question: dict, mode: str | None) -> int | None:
    """1-based rank of the relevant document in the top K, or None when it is not there."""
    reply = await bus.request(nc, "magi.memory.search", _search_request(question["q"], mode), SearchReply,
                              timeout=TIMEOUT)
    ids = [hit.parent_id or hit.id for hit in reply.hits]
    return ids.index(question["relevant"]) + 1 if question["relevant"] in ids else None


def _recall(ranks: list[int | None], k: int) -> float:
    return round(sum(1 for r in ranks if r is not None and r <= k) / len(ranks), 4) if ranks else 0.0


def _quality(ranks: list[int | None], kinds: list[str], suffix: str = "") -> dict[str, float]:
    metrics = {
        f"memory.recall_at_1{suffix}": _recall(ranks, 1),
        f"memory.recall_at_3{suffix}": _recall(ranks, 3),
        f"memory.mrr{suffix}": round(sum(1 / r for r in ranks if r is not None) / len(ranks), 4) if ranks else 0.0,
    }
    for kind in ("paraphrase", "keyword"):
        metrics[f"memory.recall_at_3{suffix}.{kind}"] = _recall([r for r, k in zip(ranks, kinds) if k == kind], 3)
    return metrics


def _summary(ranks_by_mode: dict[str | None, list[int | None]], kinds: list[str], n_docs: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for mode, ranks in ranks_by_mode.items():
        metrics.update(_quality(ranks, kinds, "" if mode is None else f".{mode}"))
    metrics["memory.eval.questions"] = len(kinds)
    metrics["memory.eval.documents"] = n_docs
    return metrics


async def measure_memory_recall(home, nats_url: str, progress=print) -> dict[str, float]:
    data = json.loads(DATA.read_text())
    nc = await stack.connect_as(home, nats_url, "admin")
    ranks: dict[str | None, list[int | None]] = {}
    try:
        progress(f"memory: upserting {len(data['documents'])} documents into namespace {NAMESPACE!r}")
        await upsert_documents(nc, data["documents"])
        for mode in (None, *MODES):
            progress(f"memory: searching {len(data['questions'])} questions (k={K}, mode {mode or 'default'})")
            ranks[mode] = [await _rank(nc, q, mode) for q in data["questions"]]
    finally:
        await nc.close()
    return _summary(ranks, [q["kind"] for q in data["questions"]], len(data["documents"]))


# -- 100k ----------------------------------------------------------------------------------------------------------

SCALE_N = 100_000
SCALE_DIM = 384
SCALE_QUERIES = 300  # latency samples per mode (p99 over 300 is the 3rd slowest)
SCALE_RECALL_QUERIES = 200
VOCABULARY = 20_000  # random words; 12 per document, so a word is in ~60 documents
WORDS_PER_DOC = 12
CLUSTERS = 1_000  # see _draw


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _draw(rng: np.random.Generator, centres: np.ndarray | None, n: int) -> np.ndarray:
    """n random unit vectors: uniform on the sphere (centres None), or each around one of `centres`.

    Uniform vectors in 384 dimensions have no neighbourhood structure at all (every pair is nearly orthogonal,
    the 10th and 1,000th nearest neighbour differ in cosine by a few hundredths), which no approximate index
    handles well and no embedding model produces; sentence embeddings cluster by topic. The clustered draw
    (each vector a centre plus noise of the same norm: cosine ~0.7 to its centre, ~0.5 within a cluster, ~0
    across) stands in for those; the uniform figure is reported alongside as the worst case.
    """
    noise = rng.standard_normal((n, SCALE_DIM), dtype=np.float32) / np.sqrt(SCALE_DIM)
    if centres is None:
        return _unit(noise)
    return _unit(centres[rng.integers(0, len(centres), n)] + noise)


async def _scale_run(dsn: str, rng: np.random.Generator, clustered: bool, progress) -> dict[str, float]:
    from services.memory.store import MemoryStore

    centres = _unit(rng.standard_normal((CLUSTERS, SCALE_DIM), dtype=np.float32)) if clustered else None
    vectors = _draw(rng, centres, SCALE_N)
    vocab = [f"w{i:05d}" for i in range(VOCABULARY)]
    words = rng.integers(0, VOCABULARY, size=(SCALE_N, WORDS_PER_DOC))
    store = await MemoryStore.open(dsn, SCALE_DIM, "random-unit-vectors")
    metrics: dict[str, float] = {}
    try:
        started = time.perf_counter()
        rows = ((f"doc{i}", "bench", " ".join(vocab[j] for j in words[i]), {}, vectors[i]) for i in range(SCALE_N))
        await store.bulk_load(rows)
        load_s = time.perf_counter() - started
        progress(f"memory: {SCALE_N:,} documents loaded and indexed in {load_s:.0f} s")
        modes = ("hybrid", "vector", "text")
        queries = _draw(rng, centres, SCALE_RECALL_QUERIES + (len(modes) + 1) * SCALE_QUERIES)
        texts = [" ".join(vocab[j] for j in rng.integers(0, VOCABULARY, 4)) for _ in range(len(queries))]
        overlap = []
        for q in queries[:SCALE_RECALL_QUERIES]:
            hits = await store.search(namespace="bench", k=10, vector=q, mode="vector")
            exact = {f"doc{j}" for j in np.argpartition(-(vectors @ q), 10)[:10]}
            overlap.append(len(exact & {h.id for h in hits}) / 10)
        suffix = "" if clustered else ".uniform"
        metrics[f"memory.recall_at_10_vs_exact{suffix}"] = round(float(np.mean(overlap)), 4)
        if clustered:
            metrics["memory.load_100k_s"] = round(load_s, 1)
            start = SCALE_RECALL_QUERIES
            for i in range(start, start + SCALE_QUERIES):  # warm the caches with queries of their own
                await store.search(namespace="bench", k=10, vector=queries[i], text=texts[i], mode="hybrid")
            latencies: dict[str, list[float]] = {mode: [] for mode in modes}
            # Interleaved, so a noisy moment on the machine hits every mode alike; each mode its own queries,
            # so none finds the pages another mode's identical query just brought into the cache.
            for n in range(SCALE_QUERIES):
                for m, mode in enumerate(modes):
                    i = start + (m + 1) * SCALE_QUERIES + n
                    t = time.perf_counter()
                    await store.search(namespace="bench", k=10, vector=queries[i], text=texts[i], mode=mode)
                    latencies[mode].append((time.perf_counter() - t) * 1000)
            for mode, samples in latencies.items():
                name = "memory.search_ms" if mode == "hybrid" else f"memory.search_ms.{mode}"
                metrics[f"{name}.p50_100k"] = round(float(np.percentile(samples, 50)), 2)
                metrics[f"{name}.p99_100k"] = round(float(np.percentile(samples, 99)), 2)
    finally:
        await store.close()
    return metrics


async def measure_memory_scale(pg_dsn: str, progress=print, uniform: bool = True) -> dict[str, float]:
    """Search at 100k documents through MemoryStore, in throwaway databases next to the stack's."""
    import psycopg

    rng = np.random.default_rng(20240610)
    metrics: dict[str, float] = {}
    kinds = [True, False] if uniform else [True]
    for clustered in kinds:
        name = f"magi_bench_{uuid.uuid4().hex[:8]}"
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
            await admin.execute(f"CREATE DATABASE {name}")
            try:
                dsn = psycopg.conninfo.make_conninfo(pg_dsn, dbname=name)
                progress(f"memory: {SCALE_N:,} {'clustered' if clustered else 'uniform'} random unit vectors "
                         f"in database {name}")
                metrics.update(await _scale_run(dsn, rng, clustered, progress))
            finally:
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return metrics

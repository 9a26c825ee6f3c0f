"""Retrieval quality of `magi.memory.search` on a labelled home-lab set (benchmarks/data/memory_eval.json).

Each question has exactly one relevant document. Half are paraphrases that share few words with it, half
name a rare token (a port, serial, path, VLAN id): the split shows where dense embeddings do well and where
they miss exact tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from protos.memory import MemoryDoc, SearchReply, SearchRequest, UpsertReply, UpsertRequest
from shared import bus, stack

DATA = Path(__file__).resolve().parent / "data" / "memory_eval.json"
NAMESPACE = "eval"  # kept apart from any real memories in the stack
K = 10
BATCH = 32  # documents per upsert: one embed call each, well under the request timeout on a small CPU
TIMEOUT = 120.0


def _search_request(text: str) -> SearchRequest:
    # No mode given: the request keeps the proto's default search mode (dense cosine today; if a `mode`
    # field is added, its default), which is what callers get and so what this benchmark should track.
    return SearchRequest(text=text, k=K, namespace=NAMESPACE)


async def _upsert(nc, documents: list[dict]) -> None:
    for start in range(0, len(documents), BATCH):
        docs = [MemoryDoc(id=d["id"], text=d["text"], namespace=NAMESPACE) for d in documents[start:start + BATCH]]
        await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=docs), UpsertReply, timeout=TIMEOUT)


async def _rank(nc, question: dict) -> int | None:
    """1-based rank of the relevant document in the top K, or None when it is not there."""
    reply = await bus.request(nc, "magi.memory.search", _search_request(question["q"]), SearchReply, timeout=TIMEOUT)
    ids = [hit.id for hit in reply.hits]
    return ids.index(question["relevant"]) + 1 if question["relevant"] in ids else None


def _recall(ranks: list[int | None], k: int) -> float:
    return round(sum(1 for r in ranks if r is not None and r <= k) / len(ranks), 4) if ranks else 0.0


def _summary(ranks: list[int | None], kinds: list[str], n_docs: int) -> dict[str, float]:
    metrics = {
        "memory.recall_at_1": _recall(ranks, 1),
        "memory.recall_at_3": _recall(ranks, 3),
        "memory.mrr": round(sum(1 / r for r in ranks if r is not None) / len(ranks), 4),
    }
    for kind in ("paraphrase", "keyword"):
        metrics[f"memory.recall_at_3.{kind}"] = _recall([r for r, k in zip(ranks, kinds) if k == kind], 3)
    metrics["memory.eval.questions"] = len(ranks)
    metrics["memory.eval.documents"] = n_docs
    return metrics


async def measure_memory_recall(home, nats_url: str, progress=print) -> dict[str, float]:
    data = json.loads(DATA.read_text())
    nc = await stack.connect_as(home, nats_url, "admin")
    try:
        progress(f"memory: upserting {len(data['documents'])} documents into namespace {NAMESPACE!r}")
        await _upsert(nc, data["documents"])
        mode = getattr(_search_request(""), "mode", "default")
        progress(f"memory: searching {len(data['questions'])} questions (k={K}, mode {mode})")
        ranks = [await _rank(nc, q) for q in data["questions"]]
    finally:
        await nc.close()
    return _summary(ranks, [q["kind"] for q in data["questions"]], len(data["documents"]))

"""The seed-000 demo mission and the documents it seeds into memory."""

from __future__ import annotations

from protos.memory import MemoryDoc
from protos.mission import MissionRequest

DOCUMENTS = [
    "A cluster scheduler decides which node runs each job, matching requests for RAM, CPU and GPU to free capacity.",
    "Without a scheduler, jobs pile onto the same machine while others sit idle; placement spreads the load.",
    "Schedulers enforce hard constraints such as GPU requirements and anti-affinity, then score the nodes that remain.",
    "When a node stops sending heartbeats, the scheduler marks it unavailable and moves its work elsewhere.",
    "NATS is a message bus: services answer requests on subjects like magi.mission.run.",
    "pgvector stores embeddings in PostgreSQL and finds nearest neighbours with an HNSW index.",
]


def documents(namespace: str = "default") -> list[MemoryDoc]:
    return [MemoryDoc(text=text, namespace=namespace, metadata={"source": "demo"}) for text in DOCUMENTS]


def mission() -> MissionRequest:
    return MissionRequest(
        prompt="Why do clusters need schedulers?",
        needs_deep_analysis=True,
        variations=["in one line", "as a haiku", "for a five-year-old"],
        context_needed=True,
        max_tokens=64,
    )

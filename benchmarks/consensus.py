"""`consensus.decide_ms`: one decision over 10 clone answers, the embedding call and the SurrealDB write
included, as a mission's last step pays it; and the embedding call alone, to show where the time goes."""

from __future__ import annotations

import time

from protos.consensus import ConsensusRecord, DecideRequest, Vote
from protos.infer import EmbedReply, EmbedRequest
from shared import bus, stack

ANSWERS = [
    "The scheduler places each instance on the node with the most free RAM that meets its GPU needs.",
    "Instances go to nodes with enough memory and the right GPU; the emptiest suitable node wins.",
    "It picks a node that satisfies the hard constraints, then prefers moderate utilisation.",
    "Placement checks RAM, GPU and anti-affinity first and scores what is left.",
    "Paris is the capital of France.",
    "Jobs land where resources are free.",
    "Use NATS subjects for every service call.",
    "The node with the lowest load gets the instance, unless a GPU is required.",
    "Constraints first (RAM, GPU, affinity), then a score balancing load across nodes.",
    "Nodes between 30 and 70 percent RAM after placement score best.",
]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_decide(home, nats_url: str, rounds: int = 100) -> dict[str, float]:
    nc = await stack.connect_as(home, nats_url)
    votes = [Vote(clone_id=f"c{i}", text=t) for i, t in enumerate(ANSWERS)]
    decide, embed = [], []
    try:
        for i in range(rounds + 5):  # the first few warm the replica and the store
            t0 = time.perf_counter()
            record = await bus.request(nc, "magi.consensus.decide", DecideRequest(votes=votes, strategy="medoid"),
                                       ConsensusRecord, timeout=30)
            t1 = time.perf_counter()
            await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=ANSWERS), EmbedReply, timeout=30)
            t2 = time.perf_counter()
            if i >= 5:
                decide.append((t1 - t0) * 1000)
                embed.append((t2 - t1) * 1000)
    finally:
        await nc.close()
    assert record.similarity == "embedding", "the consensus service decided without the embedding model"
    return {"consensus.decide_ms.p50": round(_percentile(decide, 0.5), 2),
            "consensus.decide_ms.p99": round(_percentile(decide, 0.99), 2),
            "consensus.embed10_ms.p50": round(_percentile(embed, 0.5), 2)}

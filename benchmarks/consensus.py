"""`consensus.decide_ms`: one decision over 10 clone answers, the embedding call (answers and prompt) and the
SurrealDB write (record, votes and mission graph) included, as a mission's last step pays it with a
strategy that picks (`medoid`); and the embedding call alone, to show where the time goes. `synthesize`
adds one heavy-model generation on top, measured apart (`consensus.synthesize_ms.p50`)."""

from __future__ import annotations

import time

from magi import stack
from protos.consensus import ConsensusRecord, DecideRequest, Vote
from protos.infer import EmbedReply, EmbedRequest
from shared import bus

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


SYNTH_ROUNDS = 8
PROMPT = "How does the scheduler choose a node for an instance?"


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
            request = DecideRequest(votes=votes, strategy="medoid", prompt=PROMPT, mission_id=f"bench-decide-{i}")
            record = await bus.request(nc, "magi.consensus.decide", request, ConsensusRecord, timeout=30)
            t1 = time.perf_counter()
            await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=ANSWERS), EmbedReply, timeout=30)
            t2 = time.perf_counter()
            if i >= 5:
                decide.append((t1 - t0) * 1000)
                embed.append((t2 - t1) * 1000)
        synthesized = await _synthesize(nc, votes)
    finally:
        await nc.close()
    assert record.similarity == "embedding", "the consensus service decided without the embedding model"
    return {**synthesized, "consensus.decide_ms.p50": round(_percentile(decide, 0.5), 2),
            "consensus.decide_ms.p99": round(_percentile(decide, 0.99), 2),
            "consensus.embed10_ms.p50": round(_percentile(embed, 0.5), 2)}


async def _synthesize(nc, votes: list[Vote], rounds: int = SYNTH_ROUNDS) -> dict[str, float]:
    """`synthesize` end to end: grouping, one heavy-model generation (96 tokens at most), attribution, store."""
    took, cited = [], []
    for i in range(rounds):
        request = DecideRequest(votes=votes, strategy="synthesize", prompt=PROMPT, mission_id=f"bench-synth-{i}",
                                max_tokens=96)
        t0 = time.perf_counter()
        record = await bus.request(nc, "magi.consensus.decide", request, ConsensusRecord, timeout=120)
        took.append((time.perf_counter() - t0) * 1000)
        assert record.synthesis and not record.synthesis.fallback, record.synthesis
        cited.append(len(record.synthesis.cited) / len(record.synthesis.inputs))
    return {"consensus.synthesize_ms.p50": round(_percentile(took, 0.5), 2),
            "consensus.synthesize.cited_share": round(sum(cited) / len(cited), 3)}

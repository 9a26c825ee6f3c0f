"""`magi.consensus.history`: questions to the mission graph (README, "Mission graph").

- By prompt: earlier missions whose prompts mean much the same. The query prompt is embedded with one
  `magi.infer.embed` call and SurrealDB ranks the stored prompt embeddings by cosine
  (`vector::similarity::cosine`), returning the best k. Without an embedder (or when no stored prompt was
  embedded by a model of the same dimension) the latest `WORDS_SCAN` prompts are ranked by word overlap
  (token-set Jaccard), off the event loop, and the reply says `similarity: "words"`.
- By node: the graph from the node record back along `ran_on` to the clones that ran there, and on to
  the mission that spawned each, the vote it cast and whether the consensus chose from (and a synthesis
  cited) that vote; with a summary over every vote the node cast.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from protos.consensus import HistoryReply, HistoryRequest
from services.consensus.store import WORDS_SCAN, ConsensusStore
from services.consensus.strategies import similarity as word_similarity
from shared.errors import BadRequest

Embed = Callable[[list[str]], Awaitable[np.ndarray | None]]


def rank_by_words(prompt: str, prompts: list[tuple[object, str]], k: int) -> list[tuple[object, float]]:
    """The k (record id, score) pairs whose prompt shares the most words with `prompt`; none sharing none."""
    scored = [(rid, word_similarity(prompt, text)) for rid, text in prompts]
    scored = [(rid, score) for rid, score in scored if score > 0]
    scored.sort(key=lambda pair: pair[1], reverse=True)  # stable: equal scores keep newest first
    return scored[:k]


class MissionHistory:
    def __init__(self, store: ConsensusStore, embed: Embed) -> None:
        self.store = store
        self.embed = embed

    async def answer(self, req: HistoryRequest) -> HistoryReply:
        prompt, node = req.prompt.strip(), req.node.strip()
        if bool(prompt) == bool(node):
            raise BadRequest("give exactly one of prompt (similar missions) and node (its clones' votes)",
                             field="node" if prompt else "prompt")
        if node:
            contributions, summary = await self.store.node_votes(node, req.k)
            return HistoryReply(node=node, contributions=contributions, summary=summary)
        vectors = await self.embed([prompt])
        if vectors is not None and len(vectors):
            similar = await self.store.similar_missions(vectors[0].tolist(), req.k)
            if similar:
                return HistoryReply(similarity="embedding", similar=similar)
        prompts = await self.store.recent_prompts(WORDS_SCAN)
        ranked = await asyncio.to_thread(rank_by_words, prompt, prompts, req.k)
        similar = await self.store.missions([rid for rid, _ in ranked], [score for _, score in ranked])
        return HistoryReply(similarity="words", similar=similar)

"""`magi.consensus.decide` / `magi.consensus.get` / `magi.consensus.history`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np

from protos.consensus import ConsensusRecord, DecideRequest, GetRequest, HistoryReply, HistoryRequest, Vote
from protos.infer import EmbedReply, EmbedRequest
from services.consensus import engine_time
from services.consensus.history import MissionHistory
from services.consensus.store import ConsensusStore
from services.consensus.strategies import decide
from services.consensus.synthesis import DEFAULT_TIMEOUT_S as SYNTHESIS_TIMEOUT_S
from services.consensus.synthesis import Synthesizer
from shared import bus
from shared.config import Settings
from shared.errors import BadRequest, MagiError, NotFound
from shared.service import MagiService, RequestContext

VERSION = "0.3.0"
log = logging.getLogger("magi.consensus")


EMBED_TIMEOUT_S = 10.0
INLINE_VOTES = 6  # about 0.15 ms of grouping here (4 votes: 0.09 ms, 8: 0.25 ms)
STORE_MARGIN_S = 1.0  # of the caller's time kept for storing the record and replying


class ConsensusEndpoints:
    def __init__(self, store: ConsensusStore, nc=None) -> None:
        self.store = store
        self.nc = nc
        self.embedder = bus.Outage("the embedding model (magi.infer.embed); deciding by words", log)
        self.synthesizer = Synthesizer(nc, self.embed)
        self.missions = MissionHistory(store, self.embed)

    async def embed(self, texts: list[str]) -> np.ndarray | None:
        """One `magi.infer.embed` call; None (similarity by words) when no embedder answers."""
        if self.nc is None:
            return None
        try:
            request = EmbedRequest(texts=[t if t.strip() else " " for t in texts])
            reply = await bus.request(self.nc, "magi.infer.embed", request, EmbedReply, timeout=EMBED_TIMEOUT_S)
        except MagiError as exc:
            self.embedder.failed(exc)
            return None
        self.embedder.ended()
        engine_time.add(reply.engine_ms)
        return np.array(reply.vectors, dtype=np.float32)

    async def vectors(self, votes: list[Vote], prompt: str = "") -> tuple[np.ndarray | None, list[float] | None]:
        """The votes' vectors and the prompt's (for the mission graph), from one embed call."""
        vectors = await self.embed([v.text for v in votes] + ([prompt] if prompt else []))
        if vectors is None or not prompt:
            return vectors, None
        return vectors[:-1], vectors[-1].tolist()

    async def decide(self, req: DecideRequest, ctx: RequestContext) -> ConsensusRecord:
        with engine_time.counting() as spent:
            record = await self._decide(req)
        record.engine_ms = round(spent.ms, 2)
        return record

    async def _decide(self, req: DecideRequest) -> ConsensusRecord:
        started = time.monotonic()
        vectors, prompt_vector = await self.vectors(req.votes, req.prompt)
        # `synthesize` groups like `medoid`; the medoid is its answer whenever the heavy model cannot write one.
        base = "medoid" if req.strategy == "synthesize" else req.strategy
        # Grouping is O(n²) in the votes (up to 512): off the event loop, unless there are a mission's few, which
        # take microseconds, less than the hop to a worker thread.
        if len(req.votes) <= INLINE_VOTES:
            decision = decide(req.votes, base, vectors)
        else:
            decision = await asyncio.to_thread(decide, req.votes, base, vectors)
        synthesis = None
        if req.strategy == "synthesize":
            budget = (req.timeout_s or SYNTHESIS_TIMEOUT_S) - (time.monotonic() - started) - STORE_MARGIN_S
            written = await self.synthesizer.write(req.prompt, decision, req.votes, vectors, req.max_tokens,
                                                   max(budget, 0.5))
            decision, synthesis = dataclasses.replace(decision, answer=written.text), written.synthesis
        # What was stored, as `get` reads it back (the write returns it: no second round trip to the database).
        return await self.store.save_record(decision, req.votes, req.strategy, req.mission_id, prompt=req.prompt,
                                            prompt_vector=prompt_vector, synthesis=synthesis)

    async def get(self, req: GetRequest, ctx: RequestContext) -> ConsensusRecord:
        if bool(req.id) == bool(req.mission_id):
            raise BadRequest("give exactly one of id and mission_id", field="id")
        if req.id:
            return await self.store.get(req.id)
        ids = await self.store.ids_of_mission(req.mission_id)
        if not ids:
            raise NotFound(f"no consensus record for mission {req.mission_id}", field="mission_id")
        record = await self.store.get(ids[0])
        record.copies = len(ids)
        return record

    async def history(self, req: HistoryRequest, ctx: RequestContext) -> HistoryReply:
        """The mission graph: earlier missions like a prompt, or what a node's clones contributed."""
        return await self.missions.answer(req)


async def build(settings: Settings):
    store = await ConsensusStore.open(settings)
    service = MagiService("magi-consensus", VERSION, "Merges clone answers; votes and decisions in SurrealDB", settings)
    nc = await service.connect()
    endpoints = ConsensusEndpoints(store, nc)
    service.endpoint("magi.consensus.decide", DecideRequest, endpoints.decide)
    service.endpoint("magi.consensus.get", GetRequest, endpoints.get)
    service.endpoint("magi.consensus.history", HistoryRequest, endpoints.history)
    return service, store.close

"""`magi.consensus.decide` / `magi.consensus.get`."""

from __future__ import annotations

from protos.consensus import ConsensusRecord, DecideRequest, GetRequest
from services.consensus.store import ConsensusStore
from services.consensus.strategies import decide
from shared.config import Settings
from shared.errors import BadRequest, NotFound
from shared.service import MagiService, RequestContext

VERSION = "0.1.0"


class ConsensusEndpoints:
    def __init__(self, store: ConsensusStore) -> None:
        self.store = store

    async def decide(self, req: DecideRequest, ctx: RequestContext) -> ConsensusRecord:
        decision = decide(req.votes, req.strategy)
        record_id = await self.store.save(decision, req.votes, req.strategy, req.mission_id)
        return await self.store.get(record_id)  # what was stored, read back

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


async def build(settings: Settings):
    store = await ConsensusStore.open(settings)
    service = MagiService("magi-consensus", VERSION, "Merges clone answers; votes and decisions in SurrealDB", settings)
    endpoints = ConsensusEndpoints(store)
    service.endpoint("magi.consensus.decide", DecideRequest, endpoints.decide)
    service.endpoint("magi.consensus.get", GetRequest, endpoints.get)
    await service.connect()
    return service, store.close

"""A mission: memory context, shadow clones in parallel, consensus, one reply.

`Orchestrator` runs one mission; `MissionDesk` is the durable front door (`magi.mission.run`,
`magi.mission.get`); `services.orchestrator.queue` runs every accepted mission from JetStream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import msgspec
from nats.aio.client import Client

from protos.consensus import ConsensusRecord, DecideRequest, Vote
from protos.infer import GenerateReply, GenerateRequest
from protos.memory import MemoryDoc, SearchHit, SearchReply, SearchRequest, UpsertReply, UpsertRequest
from protos.mission import CloneResult, ConsensusSummary, MissionGet, MissionReply, MissionRequest
from services.orchestrator.budgets import Budgets
from services.orchestrator.desk import MissionDesk
from services.orchestrator.events import MissionEvents
from services.orchestrator.plan import CloneTask, plan_clones
from services.orchestrator.queue import MissionQueue
from services.orchestrator.timings import MissionClock, critical_engine_ms
from services.orchestrator.watch import Disruptions
from shared import bus
from shared.config import Settings
from shared.errors import BadRequest, DeadlineExceeded, MagiError, Unavailable, Unprocessable, translate
from shared.roles import check_output_subject
from shared.service import MagiService, RequestContext
from shared.telemetry import current_trace_id, tracer

VERSION = "0.4.0"
MISSIONS_NAMESPACE = "missions"  # every mission's consensus answer is remembered here
REMEMBER_TIMEOUT_S = 15.0
MEMORY_TEXT_MAX = 32768  # protos.memory.MemoryDoc.text's limit
log = logging.getLogger("magi.orchestrator")
_encoder = msgspec.json.Encoder()


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


class Orchestrator:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.budgets = Budgets(nc)
        self.remembering = bus.Outage("memory (remembering mission answers)", log)
        self.events = MissionEvents(nc)

    async def run(self, mission: MissionRequest, ctx: RequestContext, mission_id: str = "") -> MissionReply:
        why = check_output_subject(mission.progress_subject) if mission.progress_subject else None
        if why:
            raise BadRequest(why, field="progress_subject")
        started = time.perf_counter()
        deadline = started + mission.deadline_s
        mission_id = mission_id or uuid.uuid4().hex
        try:
            reply = await asyncio.wait_for(self._run(mission, mission_id, started, deadline), mission.deadline_s)
        except asyncio.TimeoutError:
            error = DeadlineExceeded(f"mission exceeded its deadline of {mission.deadline_s} s", field="deadline_s")
            await self.events.failed(mission_id, error)
            raise error from None
        except Exception as exc:
            await self.events.failed(mission_id, translate(exc))
            raise
        await self.events.decided(reply)
        return reply

    async def _run(self, mission: MissionRequest, mission_id: str, started: float, deadline: float) -> MissionReply:
        clock = MissionClock(started)
        with tracer().start_as_current_span("mission", attributes={"magi.mission_id": mission_id}):
            with clock.stage("memory"):
                hits = await self._context(mission, deadline, clock) if mission.context_needed else []
            with clock.stage("plan"):
                tasks = plan_clones(mission, hits, await self.budgets.get())
                await self.events.started(mission_id, mission.prompt, mission.consensus, tasks)
            seen = [h.id for h in hits]
            finished: list[CloneResult] = []  # in finishing order: the last one is the stage's critical path
            with clock.stage("clones"):
                clones = await asyncio.gather(*(self._clone(task, mission, mission_id, deadline, seen, finished)
                                                for task in tasks))
            clock.spent("clones", critical_engine_ms(finished))
            if not any(c.ok for c in clones):
                why = "every clone failed: " + "; ".join(f"{c.clone_id}: {c.error}" for c in clones)
                # Models down or restarting may be back at the next attempt; empty or refused answers won't be.
                transient = any((c.error or "")[:1] == "5" for c in clones)
                raise Unavailable(why) if transient else Unprocessable(why)
            with clock.stage("consensus"):
                record = await self._decide(mission, mission_id, clones, deadline)
            clock.spent("consensus", record.engine_ms)
            with clock.stage("remember"):
                await self._remember(mission, mission_id, record, deadline, clock)
            return MissionReply(
                mission_id=mission_id,
                consensus=ConsensusSummary(
                    id=record.id, answer=record.answer, strategy=record.strategy,
                    agreement=record.agreement, votes=len(record.votes), winner=record.winner,
                    similarity=record.similarity, cited=record.synthesis.cited if record.synthesis else [],
                ),
                clones=list(clones),
                context=hits,
                timings=clock.timings(),
                trace_id=current_trace_id(),
            )

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.05, deadline - time.perf_counter())

    async def _context(self, mission: MissionRequest, deadline: float, clock: MissionClock) -> list[SearchHit]:
        query = SearchRequest(namespace=mission.namespace, k=mission.k, embedding=mission.embedding,
                              text=None if mission.embedding is not None else mission.prompt)
        reply = await bus.request(self.nc, "magi.memory.search", query, SearchReply, timeout=self._left(deadline))
        clock.spent("memory", reply.embed_ms)
        return reply.hits

    async def _clone(self, task: CloneTask, mission: MissionRequest, mission_id: str, deadline: float,
                     context_ids: list[str], finished: list[CloneResult]) -> CloneResult:
        result = CloneResult(clone_id=task.clone_id, role=task.role, variation=task.variation, context_ids=context_ids)
        request = GenerateRequest(role=task.role, prompt=task.prompt, max_tokens=task.max_tokens, temperature=0.7,
                                  timeout_s=self._left(deadline))
        t0 = time.perf_counter()
        try:
            reply = await bus.request(self.nc, "magi.infer.generate", request, GenerateReply, timeout=self._left(deadline))
        except MagiError as exc:
            result.error = f"{exc.code}: {exc.message}"
        except Exception as exc:  # a clone's failure is reported in its row, the mission goes on
            result.error = translate(exc).message
        else:
            result.ok = bool(reply.text.strip())
            result.error = None if result.ok else "empty answer"
            result.text, result.model, result.node, result.replica = reply.text, reply.model, reply.node, reply.replica
            result.completion_tokens, result.engine_ms = reply.usage.completion_tokens, reply.engine_ms
        result.latency_ms = _ms(t0)
        finished.append(result)
        if mission.progress_subject:
            await self.nc.publish(mission.progress_subject, _encoder.encode(result))
        await self.events.clone(mission_id, result)
        return result

    async def _decide(self, mission: MissionRequest, mission_id: str, clones, deadline: float) -> ConsensusRecord:
        votes = [Vote(clone_id=c.clone_id, text=c.text, role=c.role, model=c.model, node=c.node, ok=c.ok,
                      latency_ms=c.latency_ms) for c in clones]
        left = self._left(deadline)
        request = DecideRequest(votes=votes, strategy=mission.consensus, mission_id=mission_id, prompt=mission.prompt,
                                timeout_s=round(min(left, 3600.0), 3))
        return await bus.request(self.nc, "magi.consensus.decide", request, ConsensusRecord, timeout=left)

    async def _remember(self, mission: MissionRequest, mission_id: str, record: ConsensusRecord,
                        deadline: float, clock: MissionClock) -> None:
        """The answer goes into memory (namespace `missions`) so later missions can recall it. Best effort: the
        mission's result is already decided and stored, so a memory outage is logged, never fails the mission."""
        doc = MemoryDoc(id=f"mission-{mission_id}", namespace=MISSIONS_NAMESPACE,
                        text=f"Q: {mission.prompt}\nA: {record.answer}"[:MEMORY_TEXT_MAX],
                        metadata={"mission_id": mission_id, "prompt": mission.prompt, "consensus_id": record.id,
                                  "strategy": record.strategy, "agreement": record.agreement,
                                  "clone_ids": [v.clone_id for v in record.votes]})
        try:
            reply = await bus.request(self.nc, "magi.memory.upsert", UpsertRequest(documents=[doc]), UpsertReply,
                                      timeout=min(REMEMBER_TIMEOUT_S, self._left(deadline)))
        except MagiError as exc:
            self.remembering.failed(exc)
        else:
            self.remembering.ended()
            clock.spent("remember", reply.embed_ms)

async def build(settings: Settings):
    service = MagiService("magi-orchestrator", VERSION, "Shadow-clone missions: fan out, merge", settings)
    disruptions = Disruptions()
    nc = await service.connect(disconnected_cb=disruptions.bus_dropped)
    await disruptions.start(nc)
    orchestrator = Orchestrator(nc)
    queue = MissionQueue(nc, orchestrator.run, disruptions, ack_wait_s=settings.mission_ack_wait_s,
                         max_deliver=settings.mission_max_deliver, concurrency=settings.mission_concurrency,
                         replicas=settings.stream_replicas, max_pending=settings.mission_max_pending)
    await queue.start()
    desk = MissionDesk(nc)
    # Missions by outcome and those refused for a full stream, for the gateway's `/metrics`.
    service.extra_stats = lambda: {**queue.stats(), "missions_refused": desk.refused}
    service.endpoint("magi.mission.run", MissionRequest, desk.run)
    service.endpoint("magi.mission.get", MissionGet, desk.get)

    # The queue stops pulling (and hands its unfinished missions back to JetStream) before the bus drains:
    # a pull loop still fetching keeps a draining connection busy until its drain timeout.
    return service, disruptions.close, queue.close

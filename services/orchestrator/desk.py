"""`magi.mission.run` and `magi.mission.get`: the request-reply door to durable missions.

`run` records the mission in JetStream before any work (the same queue `magi.mission.submit` feeds),
then waits for its result. So an orchestrator crash never loses it: another one runs it, and the caller
whose request timed out reads the result with `magi.mission.get {"mission_id"}`, or sends the same
mission (same `mission_id`) again, which waits for the one run rather than starting a second.
"""

from __future__ import annotations

import contextlib
import uuid

import msgspec
from nats.aio.client import Client

from protos.mission import SUBMIT_SUBJECT, MissionGet, MissionReply, MissionRequest
from services.orchestrator.results import Outcome, ResultStore, result_subject
from shared.errors import BadRequest, DeadlineExceeded, NotFound
from shared.roles import check_output_subject
from shared.service import RequestContext
from shared.telemetry import inject_headers

# How long `run` waits past the mission's deadline (an attempt can start late, after a redelivery).
RUN_GRACE_S = 15.0

_encoder = msgspec.json.Encoder()


class MissionDesk:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.results = ResultStore(nc)

    async def run(self, mission: MissionRequest, ctx: RequestContext) -> MissionReply:
        why = check_output_subject(mission.progress_subject) if mission.progress_subject else None
        if why:
            raise BadRequest(why, field="progress_subject")
        mission.mission_id = mission.mission_id or uuid.uuid4().hex
        # Listen before looking and before submitting: a result stored in between is not missed.
        sub = await self.nc.subscribe(result_subject(mission.mission_id), max_msgs=1)
        try:
            stored = await self.results.stored(mission.mission_id)
            if stored is not None:
                return stored.reply()
            headers = inject_headers({"Nats-Msg-Id": mission.mission_id})
            await self.nc.jetstream().publish(SUBMIT_SUBJECT, _encoder.encode(mission), headers=headers)
            try:
                msg = await sub.next_msg(timeout=mission.deadline_s + RUN_GRACE_S)
            except Exception:
                raise DeadlineExceeded(f"mission {mission.mission_id} is accepted and still running; read its result "
                                       "with magi.mission.get", field="mission_id") from None
            return Outcome(body=msg.data, headers=dict(msg.headers or {})).reply()
        finally:
            if not self.nc.is_closed:
                with contextlib.suppress(Exception):  # gone already once its one message came
                    await sub.unsubscribe()

    async def get(self, req: MissionGet, ctx: RequestContext) -> MissionReply:
        stored = await self.results.stored(req.mission_id)
        if stored is None:
            raise NotFound(f"no result for mission {req.mission_id} yet: it is queued, running, or unknown",
                           field="mission_id")
        return stored.reply()

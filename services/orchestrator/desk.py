"""`magi.mission.run` and `magi.mission.get`: the request-reply door to durable missions.

`run` records the mission in JetStream before any work (the same queue `magi.mission.submit` feeds),
then waits for its result. So an orchestrator crash never loses it: another one runs it, and the caller
whose request timed out reads the result with `magi.mission.get {"mission_id"}`, or sends the same
mission (same `mission_id`) again, which waits for the one run rather than starting a second.

Past the stream's bound (MAGI_MISSION_MAX_PENDING missions accepted and not finished; queue.py) JetStream
refuses the publish, and `run` answers 503 at once with a retry hint: about one mission's recent duration,
the time in which the orchestrators finish as many missions as they run at once.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import msgspec
from nats.aio.client import Client
from nats.js.errors import APIError

from protos.mission import SUBMIT_SUBJECT, MissionGet, MissionReply, MissionRequest
from services.orchestrator.results import Outcome, ResultStore, result_subject
from shared.errors import BadRequest, DeadlineExceeded, NotFound, Unavailable
from shared.roles import check_output_subject
from shared.service import RequestContext
from shared.telemetry import inject_headers

# How long `run` waits past the mission's deadline (an attempt can start late, after a redelivery).
RUN_GRACE_S = 15.0
STREAM_FULL = 10077  # JetStream's error code for a publish past a stream's max_msgs with discard new
# The retry hint of a refused mission: before any mission finished here, and its limits.
RETRY_AFTER_S, RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1.0, 0.25, 30.0
DURATION_WEIGHT = 0.2  # of each finished mission in the moving average of missions' durations

_encoder = msgspec.json.Encoder()


class MissionDesk:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.results = ResultStore(nc)
        self.refused = 0  # missions turned away because the stream was full
        self.duration_s = 0.0  # moving average of the missions this desk waited on, submit to result

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
            submitted = time.monotonic()
            await self._submit(mission)
            try:
                msg = await sub.next_msg(timeout=mission.deadline_s + RUN_GRACE_S)
            except Exception:
                raise DeadlineExceeded(f"mission {mission.mission_id} is accepted and still running; read its result "
                                       "with magi.mission.get", field="mission_id") from None
            self._finished(time.monotonic() - submitted)
            return Outcome(body=msg.data, headers=dict(msg.headers or {})).reply()
        finally:
            if not self.nc.is_closed:
                with contextlib.suppress(Exception):  # gone already once its one message came
                    await sub.unsubscribe()

    async def _submit(self, mission: MissionRequest) -> None:
        """Record the mission in JetStream (accepted from here on), or 503 with a retry hint when it is full."""
        headers = inject_headers({"Nats-Msg-Id": mission.mission_id})
        try:
            await self.nc.jetstream().publish(SUBMIT_SUBJECT, _encoder.encode(mission), headers=headers)
        except APIError as exc:
            if exc.err_code != STREAM_FULL:
                raise
            self.refused += 1
            raise Unavailable("too many missions are queued or running (MAGI_MISSION_MAX_PENDING); retry later",
                              retry_after_s=self.retry_after_s()) from None

    def _finished(self, seconds: float) -> None:
        weight = DURATION_WEIGHT if self.duration_s else 1.0
        self.duration_s += weight * (seconds - self.duration_s)

    def retry_after_s(self) -> float:
        hint = self.duration_s or RETRY_AFTER_S
        return round(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, hint)), 2)

    async def get(self, req: MissionGet, ctx: RequestContext) -> MissionReply:
        stored = await self.results.stored(req.mission_id)
        if stored is None:
            raise NotFound(f"no result for mission {req.mission_id} yet: it is queued, running, or unknown",
                           field="mission_id")
        return stored.reply()

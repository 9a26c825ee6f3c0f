"""The mission streams and the stored results: what makes a mission durable and its answer unique.

- `MAGI_MISSIONS` (`magi.mission.submit`): a work queue on disk. A mission is *accepted* once JetStream
  acknowledged its publish; it then stays until an orchestrator stored its outcome.
- `MAGI_MISSION_RESULTS` (`magi.mission.result.<id>`): one outcome per mission id, reply or error. Results
  carry `Nats-Msg-Id: result-<id>`, so a mission run twice (an orchestrator paused past its ack wait)
  still stores one result message.
- `MAGI_MISSIONS_DEAD` (`magi.mission.dead.<id>`): missions that failed on every attempt, with the error.

Both de-duplication windows cover the longest mission deadline (3600 s) plus slack: re-sending a mission
id within them never runs it again.
"""

from __future__ import annotations

import msgspec
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from protos.mission import (
    DEAD_PREFIX,
    DEAD_STREAM,
    RESULT_PREFIX,
    RESULT_STREAM,
    SUBMIT_STREAM,
    SUBMIT_SUBJECT,
    MissionReply,
)
from shared import errors

DEDUP_WINDOW_S = 3900.0
RESULT_MAX_AGE_S = 7 * 24 * 3600.0

_reply = msgspec.json.Decoder(MissionReply)
_encoder = msgspec.json.Encoder()


async def ensure_streams(nc: Client, replicas: int = 1, max_pending: int = 0) -> None:
    """The three streams on disk; `replicas` 3 on a 3-server NATS cluster, so losing one server loses nothing.
    The work queue holds at most `max_pending` missions (0: no bound; see queue.py, "Admission"): the bound is
    part of the stream's own config, so bringing an older stream up to date never lifts it, not even briefly."""
    for config in (
        StreamConfig(name=SUBMIT_STREAM, subjects=[SUBMIT_SUBJECT], retention=RetentionPolicy.WORK_QUEUE,
                     storage=StorageType.FILE, duplicate_window=DEDUP_WINDOW_S, num_replicas=replicas,
                     max_msgs=max_pending or -1, discard=DiscardPolicy.NEW),
        StreamConfig(name=RESULT_STREAM, subjects=[f"{RESULT_PREFIX}.>"], storage=StorageType.FILE,
                     duplicate_window=DEDUP_WINDOW_S, max_age=RESULT_MAX_AGE_S, num_replicas=replicas),
        StreamConfig(name=DEAD_STREAM, subjects=[f"{DEAD_PREFIX}.>"], storage=StorageType.FILE,
                     max_age=30 * 24 * 3600.0, num_replicas=replicas),
    ):
        await _create_or_update(nc.jetstream(), config)


async def _create_or_update(js, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:  # made by an older version with other settings: bring it up to date
        await js.update_stream(config)


def result_subject(mission_id: str) -> str:
    return f"{RESULT_PREFIX}.{mission_id}"


class Outcome(msgspec.Struct, kw_only=True):
    """A mission's stored outcome: the reply's JSON, or an error (code, message, body) in headers."""

    body: bytes
    headers: dict[str, str] = {}

    @classmethod
    def of_reply(cls, reply: MissionReply) -> "Outcome":
        return cls(body=_encoder.encode(reply))

    @classmethod
    def of_error(cls, error: errors.MagiError) -> "Outcome":
        return cls(body=_encoder.encode(error.body()),
                   headers={ERROR_HEADER: error.message, ERROR_CODE_HEADER: str(error.code)})

    @property
    def failed(self) -> bool:
        return ERROR_CODE_HEADER in self.headers

    def reply(self) -> MissionReply:
        """The stored reply, or the stored error raised as the caller would have seen it."""
        if self.failed:
            raise errors.from_reply(self.headers[ERROR_CODE_HEADER], self.headers.get(ERROR_HEADER, ""), self.body)
        return _reply.decode(self.body)


class ResultStore:
    def __init__(self, nc: Client) -> None:
        self.js = nc.jetstream()

    async def stored(self, mission_id: str) -> Outcome | None:
        try:
            msg = await self.js.get_last_msg(RESULT_STREAM, result_subject(mission_id))
        except NotFoundError:
            return None
        return Outcome(body=msg.data or b"", headers=dict(msg.headers or {}))

    async def store(self, mission_id: str, outcome: Outcome) -> bool:
        """Store once: False when this mission's result was already there (a duplicate run)."""
        headers = {**outcome.headers, "Nats-Msg-Id": f"result-{mission_id}"}
        ack = await self.js.publish(result_subject(mission_id), outcome.body, headers=headers)
        return not ack.duplicate

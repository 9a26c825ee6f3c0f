"""Missions published to JetStream (`magi.mission.submit`) instead of asked for by request-reply.

Publishing is fire-and-forget for the user but nothing is lost: the submit stream is a work queue
stored on disk, the orchestrator acknowledges a mission only after its result is stored in the
results stream under `magi.mission.result.<mission_id>`, and an unacknowledged mission is redelivered
(at-least-once; a `Nats-Msg-Id` header de-duplicates re-publishes within two minutes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import FetchTimeoutError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from protos.mission import RESULT_PREFIX, RESULT_STREAM, SUBMIT_STREAM, SUBMIT_SUBJECT, MissionReply, MissionRequest
from shared.errors import MagiError, translate
from shared.service import RequestContext

log = logging.getLogger("magi.orchestrator.queue")

DURABLE = "orchestrator"

_decoder = msgspec.json.Decoder(MissionRequest)
_encoder = msgspec.json.Encoder()

Runner = Callable[[MissionRequest, RequestContext, str], Awaitable[MissionReply]]


async def ensure_streams(nc: Client, replicas: int = 1) -> None:
    """Both streams on disk; `replicas` 3 on a 3-server NATS cluster, so losing one server loses nothing."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=SUBMIT_STREAM, subjects=[SUBMIT_SUBJECT], retention=RetentionPolicy.WORK_QUEUE,
                                     storage=StorageType.FILE, duplicate_window=120.0, num_replicas=replicas))
    await js.add_stream(StreamConfig(name=RESULT_STREAM, subjects=[f"{RESULT_PREFIX}.>"], storage=StorageType.FILE,
                                     max_age=7 * 24 * 3600.0, num_replicas=replicas))


class MissionQueue:
    def __init__(self, nc: Client, run: Runner, *, ack_wait_s: float = 600.0, replicas: int = 1) -> None:
        self.nc = nc
        self.replicas = replicas
        self.run = run
        self.ack_wait_s = ack_wait_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await ensure_streams(self.nc, self.replicas)
        js = self.nc.jetstream()
        self._sub = await js.pull_subscribe(
            SUBMIT_SUBJECT, durable=DURABLE, stream=SUBMIT_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=5),
        )
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                msgs = await self._sub.fetch(batch=4, timeout=1.0)
            except (FetchTimeoutError, NatsTimeoutError):  # nats-py 2.16 raises the latter when nothing waits
                continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fetching missions failed")
                await asyncio.sleep(1.0)
                continue
            await asyncio.gather(*(self._handle(m) for m in msgs))

    async def _handle(self, msg) -> None:
        # The publisher's Nats-Msg-Id names the mission (and de-duplicates); else the stream sequence.
        mission_id = (msg.headers or {}).get("Nats-Msg-Id") or f"seq{msg.metadata.sequence.stream}"
        mission_id = "".join(ch for ch in mission_id if ch.isalnum() or ch in "-_")[:64] or "unnamed"
        subject = f"{RESULT_PREFIX}.{mission_id}"
        try:
            reply = await self.run(_decoder.decode(msg.data), RequestContext(subject=msg.subject, headers=dict(msg.headers or {})), mission_id)
            body, headers = _encoder.encode(reply), {}
        except Exception as exc:
            error: MagiError = translate(exc)
            body = _encoder.encode(error.body())
            headers = {ERROR_HEADER: error.message, ERROR_CODE_HEADER: str(error.code)}
        await self.nc.jetstream().publish(subject, body, headers=headers)
        await msg.ack_sync()  # only now: a crash before this point means redelivery, not loss
        log.info("mission from queue done", extra={"mission_id": mission_id, "failed": bool(headers)})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

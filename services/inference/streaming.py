"""Sending a streamed generation's pieces over NATS, and noticing when nobody listens any more.

Each chunk is published with a reply subject of ours. NATS answers a message that has a reply subject
but no subscriber with a 503 "no responders" status; receiving one means the caller has gone away
(its inbox or stream subject is unsubscribed), and the generation is stopped at the next piece.
"""

from __future__ import annotations

import msgspec
from nats.aio.client import Client

from protos.infer import StreamChunk
from services.inference.pool import Replica
from services.inference.router import CallerGone
from shared.bus import STREAM_HEADER
from shared.errors import BadRequest
from shared.roles import check_output_subject

_encoder = msgspec.json.Encoder()


class ChunkSink:
    def __init__(self, nc: Client, subject: str, request_id: str, *, chosen: bool = False) -> None:
        """`chosen`: the caller named `subject` itself (`stream_subject`), rather than it being its reply inbox."""
        if not subject:
            raise BadRequest("a streamed request needs a reply inbox or a `stream_subject`", field="stream_subject")
        why = check_output_subject(subject) if chosen else None
        if why:
            raise BadRequest(why, field="stream_subject")
        self.nc = nc
        self.subject = subject
        self.request_id = request_id
        self.seq = 0
        self.gone = False
        self._probe = None

    async def __aenter__(self) -> "ChunkSink":
        self._probe = await self.nc.subscribe(self.nc.new_inbox(), cb=self._on_status)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._probe is not None:
            await self._probe.unsubscribe()

    async def _on_status(self, msg) -> None:
        if msg.headers and msg.headers.get("Status") == "503":
            self.gone = True

    async def send(self, text: str, replica: Replica) -> None:
        if self.gone:
            raise CallerGone(self.request_id)
        chunk = StreamChunk(request_id=self.request_id, seq=self.seq, text=text, replica=replica.replica_id)
        await self.nc.publish(self.subject, _encoder.encode(chunk), reply=self._probe.subject,
                              headers={STREAM_HEADER: "chunk"})
        self.seq += 1

"""Client side of MAGI subjects: typed request/reply with errors raised as `shared.errors` types."""

from __future__ import annotations

from typing import TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from shared import errors
from shared.config import Settings
from shared.telemetry import inject_headers

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}


def _decoder(reply_type: type[T]) -> msgspec.json.Decoder:
    decoder = _decoders.get(reply_type)
    if decoder is None:
        decoder = _decoders[reply_type] = msgspec.json.Decoder(reply_type)
    return decoder


async def connect(settings: Settings, name: str = "magi-client") -> Client:
    try:
        return await nats.connect(settings.nats_url, name=name, connect_timeout=3, max_reconnect_attempts=3)
    except Exception as exc:
        raise errors.Unavailable(f"cannot reach NATS at {settings.nats_url} (is the stack up? `magi up`)") from exc


async def request(nc: Client, subject: str, payload: msgspec.Struct | dict | bytes, reply_type: type[T], *, timeout: float) -> T:
    """Send a request and decode the reply, raising the service's typed error if it answered with one."""
    data = payload if isinstance(payload, bytes) else _encoder.encode(payload)
    try:
        msg = await nc.request(subject, data, timeout=timeout, headers=inject_headers())
    except Exception as exc:
        raise errors.translate(exc) from None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise errors.from_reply(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""), msg.data)
    return _decoder(reply_type).decode(msg.data)

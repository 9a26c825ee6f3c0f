"""Client side of MAGI subjects: typed request/reply with errors raised as `shared.errors` types."""

from __future__ import annotations

import logging
import re
import time
import weakref
from typing import AsyncIterator, TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from shared import errors
from shared.config import Settings
from shared.natsauth import connect_options
from shared.telemetry import inject_headers

T = TypeVar("T")
log = logging.getLogger("magi.bus")

# nats-server reports a refused publish asynchronously ("Permissions Violation for Publish to ..."), and
# the request then just times out. Remembering the refusal, per connection (a process may hold several
# identities), lets that timeout say what really happened.
_VIOLATION = re.compile(r'permissions violation for (?P<kind>publish|subscription) to "?(?P<subject>[^"\s]+)"?',
                        re.IGNORECASE)
_violations: dict[str, float] = {}  # when each refusal was last logged (throttling only)
_reported: dict[str, float] = {}
_repeats: dict[str, int] = {}  # occurrences of each error since it was last logged

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}


def _decoder(reply_type: type[T]) -> msgspec.json.Decoder:
    decoder = _decoders.get(reply_type)
    if decoder is None:
        decoder = _decoders[reply_type] = msgspec.json.Decoder(reply_type)
    return decoder


async def on_error(exc: Exception) -> None:
    """nats-py's error callback: one log line per problem, never a traceback per retry."""
    found = _VIOLATION.search(str(exc))
    if found:
        subject = found.group("subject")  # nats-py lowercases the server's message
        if time.monotonic() - _violations.get(subject, -60.0) > 60.0:
            log.warning("permission denied by nats-server", extra={"action": found.group("kind").lower(),
                                                                  "subject": subject})
            _violations[subject] = time.monotonic()
        return
    text = f"{type(exc).__name__}: {exc}"[:300]
    _repeats[text] = _repeats.get(text, 0) + 1
    if time.monotonic() - _reported.get(text, -60.0) > 60.0:  # a retrying client repeats itself twice a second
        log.warning("bus error", extra={"error": text, "times": _repeats.pop(text)})
        _reported[text] = time.monotonic()


class Outage:
    """One log line when something becomes unreachable and one when it is back, with the count between."""

    def __init__(self, what: str, logger: logging.Logger = log) -> None:
        self.what = what
        self.log = logger
        self.failures = 0
        self.since = 0.0

    def failed(self, exc: Exception) -> None:
        if self.failures == 0:
            self.since = time.monotonic()
            self.log.warning(f"{self.what} unreachable; retrying", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        self.failures += 1

    def ended(self) -> None:
        if self.failures:
            self.log.info(f"{self.what} reachable again", extra={"failures": self.failures,
                                                                 "outage_s": round(time.monotonic() - self.since, 1)})
        self.failures = 0


class Refusals:
    """One connection's error callback: logs as `on_error` does and remembers what the server refused it."""

    def __init__(self) -> None:
        self.subjects: dict[str, float] = {}

    async def note(self, exc: Exception) -> None:  # nats-py wants a coroutine function, not a callable
        found = _VIOLATION.search(str(exc))
        if found:
            self.subjects[found.group("subject")] = time.monotonic()  # nats-py lowercases the message
        await on_error(exc)

    def refused(self, subject: str, within_s: float = 120.0) -> bool:
        return time.monotonic() - self.subjects.get(subject.lower(), -1e9) < within_s


_refusals: "weakref.WeakKeyDictionary[Client, Refusals]" = weakref.WeakKeyDictionary()


def track(nc: Client, refusals: Refusals) -> Client:
    """Let `request` on `nc` report a refused publish as 403 (`refusals.note` must be its error callback)."""
    _refusals[nc] = refusals
    return nc


def refused(nc: Client, subject: str, within_s: float = 120.0) -> bool:
    """Whether nats-server recently refused this connection a publish or subscription on `subject`."""
    refusals = _refusals.get(nc)
    return refusals is not None and refusals.refused(subject, within_s)


async def connect(settings: Settings, name: str = "magi-client", role: str = "admin") -> Client:
    """A short-lived client connection as `role` (its credentials, inbox space and TLS from settings)."""
    refusals = Refusals()
    try:
        return track(await nats.connect(settings.nats_servers(), name=name, connect_timeout=3,
                                        max_reconnect_attempts=3, error_cb=refusals.note,
                                        **connect_options(settings, role)), refusals)
    except Exception as exc:
        error = errors.translate(exc)
        if error.code == 403:
            raise errors.Forbidden(f"NATS at {settings.nats_url} refused the {role!r} credentials "
                                   "(MAGI_NATS_CREDS, or $MAGI_HOME/secrets/nats/)") from None
        raise errors.Unavailable(f"cannot reach NATS at {settings.nats_url} (is the stack up? `magi up`)") from exc


async def request(nc: Client, subject: str, payload: msgspec.Struct | dict | bytes, reply_type: type[T], *, timeout: float) -> T:
    """Send a request and decode the reply, raising the service's typed error if it answered with one."""
    data = payload if isinstance(payload, bytes) else _encoder.encode(payload)
    try:
        msg = await nc.request(subject, data, timeout=timeout, headers=inject_headers())
    except Exception as exc:
        if refused(nc, subject):
            raise errors.Forbidden(f"this identity may not publish to {subject}") from None
        raise errors.translate(exc) from None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise errors.from_reply(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""), msg.data)
    return _decoder(reply_type).decode(msg.data)


STREAM_HEADER = "Magi-Stream"


async def stream_request(nc: Client, subject: str, payload: msgspec.Struct | dict, chunk_type: type, reply_type: type[T],
                         *, timeout: float) -> AsyncIterator[object]:
    """Send a streamed request and yield each chunk (`chunk_type`) as it comes, then the final reply.

    `timeout` bounds the wait for each next message, not the whole stream. Closing the generator early
    (`contextlib.aclosing`) unsubscribes, which the service notices (no responders) and stops generating.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, _encoder.encode(payload), reply=inbox, headers=inject_headers())
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except Exception as exc:
                raise errors.translate(exc) from None
            headers = msg.headers or {}
            if headers.get("Status") == "503":
                raise errors.Unavailable("no service is answering on that subject")
            if ERROR_CODE_HEADER in headers:
                raise errors.from_reply(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""), msg.data)
            if headers.get(STREAM_HEADER) == "chunk":
                yield _decoder(chunk_type).decode(msg.data)
                continue
            yield _decoder(reply_type).decode(msg.data)
            return
    finally:
        if not nc.is_closed:  # a caller may close the connection before closing this generator
            await sub.unsubscribe()

"""The mission worker: every accepted mission, from either entry point, runs here from JetStream.

Each orchestrator pulls from one shared durable consumer, so several share the work. While a mission
runs, the worker tells JetStream it is alive (`in_progress`) every third of `ack_wait`; a crashed
orchestrator's missions are therefore redelivered `ack_wait` after its last sign of life (seconds),
and a live one never loses its mission to another. The message is acknowledged only after its outcome
is stored, so a crash at any point means redelivery, never loss; a redelivered mission whose outcome is
already stored is acknowledged without running again.

Failures: a mission that fails for a reason that may pass (5xx: a service down; a deadline missed while
a service it waited on restarted or the bus dropped, see `watch`) is retried with growing delays; each
attempt has the mission's whole `deadline_s`; after `max_deliver` attempts its error is stored as its
outcome and it goes to `magi.mission.dead.<id>`. A 4xx is final at once. A failure of the worker itself
(the bus away while storing) naks the message and never stops the loop.

Admission: the work-queue stream holds exactly the missions accepted and not yet finished (a message leaves it
when its outcome is stored and acknowledged), so its own limit is the bound: `max_msgs` = MAGI_MISSION_MAX_PENDING
with `discard: new`. nats-server then refuses the publish that would exceed it, atomically, whichever
orchestrator (or `magi.mission.submit` client) sends it, and the count survives every restart because it is
the stream's state, not a process's. A check of the consumer's pending count before publishing would race
between desks and miss direct submitters. Lowering the bound never drops what is already queued (discard new
removes nothing), and a re-sent mission id is still answered as a duplicate when the stream is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import FetchTimeoutError
from nats.micro.request import ERROR_CODE_HEADER

from protos.mission import DEAD_PREFIX, SUBMIT_STREAM, SUBMIT_SUBJECT, DeadLetter, MissionReply, MissionRequest
from services.orchestrator.results import Outcome, ResultStore, ensure_streams
from services.orchestrator.watch import Disruptions
from shared import bus
from shared.config import Settings
from shared.errors import Internal, MagiError, Unavailable, translate
from shared.service import RequestContext
from shared.telemetry import extract_context, tracer

log = logging.getLogger("magi.orchestrator.queue")

DURABLE = "orchestrator"
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{SUBMIT_STREAM}.{DURABLE}"
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # before the 2nd, 3rd, ... attempt
# How settled missions ended, counted for `$SRV.STATS` (the gateway's `magi_missions_total{outcome}`).
OUTCOMES = ("ok", "rejected", "deadline", "failed")
DEFAULT_MAX_PENDING = Settings().mission_max_pending

_decoder = msgspec.json.Decoder(MissionRequest)
_encoder = msgspec.json.Encoder()

Runner = Callable[[MissionRequest, RequestContext, str], Awaitable[MissionReply]]


def mission_id_of(msg, mission: MissionRequest | None) -> str:
    """The mission's own id, else the publisher's `Nats-Msg-Id`, else the stream sequence."""
    return _mission_id(mission, msg.headers, msg.metadata.sequence.stream)


def mission_id_of_stored(msg, mission: MissionRequest | None) -> str:
    """The same id for a message read back from the stream (a `RawStreamMsg`)."""
    return _mission_id(mission, msg.headers, msg.seq)


def _mission_id(mission: MissionRequest | None, headers: dict | None, sequence: int) -> str:
    raw = (mission.mission_id if mission else "") or (headers or {}).get("Nats-Msg-Id") or ""
    raw = "".join(ch for ch in raw if ch.isalnum() or ch in "-_")[:64]
    return raw or f"seq{sequence}"


class _MaxDeliveries(msgspec.Struct):
    stream_seq: int
    deliveries: int = 0


_advisory = msgspec.json.Decoder(_MaxDeliveries)


def outcome_label(outcome: Outcome) -> str:
    """ok; rejected (4xx: the mission itself was wrong); deadline (504); failed (any other error)."""
    if not outcome.failed:
        return "ok"
    code = outcome.headers.get(ERROR_CODE_HEADER, "")
    code_n = int(code) if code.isdigit() else 500
    return "deadline" if code_n == 504 else "rejected" if code_n < 500 else "failed"


def retry_delay(attempt: int) -> float:
    return RETRY_DELAYS_S[min(attempt - 1, len(RETRY_DELAYS_S) - 1)]


class MissionQueue:
    def __init__(self, nc: Client, run: Runner, disruptions: Disruptions, *, ack_wait_s: float = 6.0, max_deliver: int = 8,
                 concurrency: int = 16, replicas: int = 1, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.nc = nc
        self.run = run
        self.disruptions = disruptions
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.concurrency = concurrency
        self.replicas = replicas
        self.max_pending = max_pending  # the stream's admission bound (module docstring); 0: none
        self.results = ResultStore(nc)
        self.running: set[asyncio.Task] = set()
        self.attempts: dict[asyncio.Task, float] = {}  # missions running now -> when they started
        disruptions.listeners.append(self._interrupt)
        self.outage = bus.Outage("mission queue", log)
        self.outcomes = dict.fromkeys(OUTCOMES, 0)  # settled here (stored by this orchestrator)
        self.retries = 0
        self._task: asyncio.Task | None = None

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s,
                              max_deliver=self.max_deliver, max_ack_pending=1024, filter_subject=SUBMIT_SUBJECT)

    async def start(self) -> None:
        await ensure_streams(self.nc, self.replicas, self.max_pending)
        js = self.nc.jetstream()
        # Create or update: a consumer left by an older version (a 600 s ack wait) takes today's settings.
        await js.add_consumer(SUBMIT_STREAM, self.consumer_config())
        self._sub = await js.pull_subscribe_bind(DURABLE, SUBMIT_STREAM)
        # A mission that stopped its orchestrator on every attempt never reaches `_attempt`'s last branch:
        # JetStream's advisory says so, and one orchestrator (a queue group) dead-letters it.
        await self.nc.subscribe(MAX_DELIVERIES_ADVISORY, queue=DURABLE, cb=self._on_max_deliveries)
        self._task = asyncio.create_task(self._loop(), name="mission-queue")

    async def _loop(self) -> None:
        while True:
            free = self.concurrency - len(self.running)
            if free <= 0:
                await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                # One at a time: nats-py's fetch of a batch that gets its first message on a waiting pull request
                # then waits for the rest until the request expires, so such a mission waited out the rest of the
                # second (measured: about 1 mission in 100 picked up 350-420 ms late; none in 250 with batch 1).
                # A fetch is one bus round trip, nothing next to a mission.
                msgs = await self._sub.fetch(batch=1, timeout=1.0)
            except (FetchTimeoutError, NatsTimeoutError, TimeoutError):  # nothing waiting (nats-py 2.16 raises
                # either of its own, or the bare TimeoutError of its wait when the server's reply is late)
                self.outage.ended()
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.outage.failed(exc)
                await asyncio.sleep(min(0.25 * 2 ** min(self.outage.failures, 3), 2.0))
                continue
            self.outage.ended()
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    async def _handle(self, msg) -> None:
        attempt = msg.metadata.num_delivered
        try:
            await self._process(msg, attempt)
        except asyncio.CancelledError:  # shutting down: hand the mission back now, not after ack_wait
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as exc:  # storing or acking failed: leave it to redelivery, keep the loop
            log.warning("mission not settled; it will be redelivered",
                        extra={"attempt": attempt, "error": f"{type(exc).__name__}: {exc}"[:200]})
            with contextlib.suppress(Exception):
                await msg.nak(delay=retry_delay(attempt))

    async def _process(self, msg, attempt: int) -> None:
        try:
            mission: MissionRequest | None = _decoder.decode(msg.data)
            problem: MagiError | None = None
        except Exception as exc:
            mission, problem = None, translate(exc)
        mission_id = mission_id_of(msg, mission)
        if await self.results.stored(mission_id) is not None:
            await msg.ack_sync()  # answered before a crash took the ack with it: never run twice
            log.info("mission already answered", extra={"mission_id": mission_id, "attempt": attempt})
            return
        headers = dict(msg.headers or {})
        with tracer().start_as_current_span("mission.queue", context=extract_context(headers),
                                            attributes={"magi.mission_id": mission_id, "magi.attempt": attempt}):
            outcome = Outcome.of_error(problem) if problem else await self._attempt(msg, mission, mission_id, attempt)
        if outcome is None:
            return  # nak'd for a later attempt
        stored = await self.results.store(mission_id, outcome)
        if stored:
            self.outcomes[outcome_label(outcome)] += 1
        await msg.ack_sync()  # only now: a crash before this point means redelivery, not loss
        log.info("mission done", extra={"mission_id": mission_id, "attempt": attempt, "failed": outcome.failed,
                                        "duplicate": not stored})

    async def _attempt(self, msg, mission: MissionRequest, mission_id: str, attempt: int) -> Outcome | None:
        ctx = RequestContext(subject=msg.subject, headers=dict(msg.headers or {}))
        started = time.monotonic()
        inner = asyncio.create_task(self.run(mission, ctx, mission_id))
        self.attempts[inner] = started
        async with self._alive(msg):
            try:
                return Outcome.of_reply(await inner)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # shutting down
                error: MagiError = Unavailable(f"interrupted: {self.disruptions.since(started) or 'a service restarted'}")
            except Exception as exc:
                error = translate(exc)
            finally:
                self.attempts.pop(inner, None)
        lost = self.disruptions.since(started) if error.code == 504 else None
        if error.code < 500 or (error.code == 504 and not lost):
            return Outcome.of_error(error)  # wrong, or merely too slow: another attempt would not help
        if attempt < self.max_deliver:
            log.warning("mission failed; retrying", extra={"mission_id": mission_id, "attempt": attempt,
                                                           "code": error.code, "error": error.message[:200],
                                                           "disruption": lost})
            await msg.nak(delay=retry_delay(attempt))
            self.retries += 1
            return None
        await self._dead_letter(msg, mission_id, attempt, error)
        return Outcome.of_error(error)

    def _interrupt(self, dependency: str) -> None:
        """A dependency's instance vanished: its requests will never be answered, so rather than wait out
        the deadline, stop the missions running now and retry them at once."""
        if self.attempts:
            log.warning("service instance gone; retrying the missions in flight",
                        extra={"service": dependency, "missions": len(self.attempts)})
        for task in list(self.attempts):
            task.cancel()

    @contextlib.asynccontextmanager
    async def _alive(self, msg):
        """Tell JetStream every third of `ack_wait` that this mission is still being worked on."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.ack_wait_s / 3)
                with contextlib.suppress(Exception):  # the bus away: the mission goes on regardless
                    await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()

    async def _on_max_deliveries(self, event) -> None:
        try:
            advisory = _advisory.decode(event.data)
            msg = await self.nc.jetstream().get_msg(SUBMIT_STREAM, advisory.stream_seq)
            mission = None
            with contextlib.suppress(Exception):
                mission = _decoder.decode(msg.data)
            mission_id = mission_id_of_stored(msg, mission)
            if await self.results.stored(mission_id) is not None:
                return  # settled after all (stored, then the ack was lost with its orchestrator)
            error = Internal(f"the mission's orchestrator stopped during each of its {advisory.deliveries} attempts")
            await self._dead_letter(msg, mission_id, advisory.deliveries, error)
            if await self.results.store(mission_id, Outcome.of_error(error)):
                self.outcomes["failed"] += 1
        except Exception as exc:  # the advisory is informational: log it, never end the subscription
            log.warning("could not dead-letter a mission past max_deliver",
                        extra={"error": f"{type(exc).__name__}: {exc}"[:200]})

    async def _dead_letter(self, msg, mission_id: str, attempts: int, error: MagiError) -> None:
        letter = DeadLetter(mission_id=mission_id, attempts=attempts, code=error.code, error=error.message,
                            mission=msg.data)
        await self.nc.jetstream().publish(f"{DEAD_PREFIX}.{mission_id}", _encoder.encode(letter),
                                          headers={"Nats-Msg-Id": f"dead-{mission_id}"})
        log.error("mission failed on every attempt; dead-lettered",
                  extra={"mission_id": mission_id, "attempts": attempts, "code": error.code, "error": error.message[:200]})

    def stats(self) -> dict:
        """For `$SRV.STATS`: missions settled here by outcome, attempts retried, missions running now."""
        return {"missions": dict(self.outcomes), "mission_retries": self.retries, "missions_running": len(self.attempts)}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self.running):  # unacknowledged: JetStream hands them to another orchestrator
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        if getattr(self, "_sub", None) is not None:  # started
            # A fetch's answer that lands after its fetch was cancelled waits in the pull subscription's queue,
            # which nobody reads any more, and a draining connection waits for that queue to empty (30 s).
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

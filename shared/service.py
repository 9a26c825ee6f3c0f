"""The one way MAGI services put endpoints on NATS.

Every service is a `nats.micro` service (name, semver version, endpoints in groups), so
`$SRV.PING/INFO/STATS` discover and monitor it. Each endpoint here:
- rejects payloads over the configured limit (413) before decoding,
- decodes with one reused msgspec Decoder per request type (400 naming the bad field),
- runs the handler in its own task, so one slow request never blocks the subscription,
- continues the caller's trace from the `traceparent` header,
- answers errors with `Nats-Service-Error` / `Nats-Service-Error-Code` headers and a JSON body,
- counts requests, errors and a latency histogram from receipt to reply, reported in `$SRV.STATS` (`nats micro
  stats` tells the truth; each endpoint's `data` carries `in_flight`, `latency` (see shared.histogram) and
  whatever the service's `extra_stats` adds), which the gateway's `/metrics` turns into Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service, ServiceConfig, ServiceStats

from shared import bus, errors
from shared.config import Settings
from shared.histogram import Histogram
from shared.natsauth import connect_options
from shared.telemetry import extract_context, tracer

log = logging.getLogger("magi.service")

Req = TypeVar("Req", bound=msgspec.Struct)
Handler = Callable[[Any, "RequestContext"], Awaitable[msgspec.Struct]]

_encoder = msgspec.json.Encoder()
# The retry hint of an endpoint's refusal past `max_concurrency`: a second is long next to one bus request, and
# the endpoint knows nothing of how fast its work drains (a model pool's own refusal estimates that).
ENDPOINT_RETRY_AFTER_S = 1.0


@dataclass
class RequestContext:
    subject: str
    headers: dict[str, str]
    received: float = field(default_factory=time.monotonic)
    reply: str = ""  # the caller's inbox, for endpoints that send several messages (streams)


@dataclass
class EndpointCounters:
    requests: int = 0  # finished: answered or failed
    errors: int = 0
    in_flight: int = 0
    last_error: str = ""
    processing_ns: int = 0  # from receipt to the reply going out, summed over `requests`
    latency: Histogram = field(default_factory=Histogram)  # the same times, bucketed: its count is `requests`

    def finished(self, elapsed_ns: int) -> None:
        self.requests += 1
        self.processing_ns += elapsed_ns
        self.latency.observe(elapsed_ns / 1e9)


@dataclass
class _Endpoint(Generic[Req]):
    subject: str
    request_type: type[Req]
    handler: Handler
    max_concurrency: int
    decoder: msgspec.json.Decoder = field(init=False)
    counters: EndpointCounters = field(default_factory=EndpointCounters)

    def __post_init__(self) -> None:
        self.decoder = msgspec.json.Decoder(self.request_type)


async def respond_error(request: Request, error: errors.MagiError) -> None:
    await request.respond_error(str(error.code), error.message, data=_encoder.encode(error.body()))


class MagiService:
    """A NATS micro service with typed endpoints; see the module docstring for what each endpoint does."""

    def __init__(self, name: str, version: str, description: str, settings: Settings, *, identity: str = "") -> None:
        self.name = name
        self.identity = identity or name.removeprefix("magi-")  # its bus role (shared.roles)
        self.version = version
        self.description = description
        self.settings = settings
        self.nc: Client | None = None
        self._endpoints: list[_Endpoint] = []
        self._tasks: set[asyncio.Task] = set()
        self._service: Service | None = None
        # Service-wide figures (queue depth, missions by outcome, the placement epoch) added to every endpoint's
        # `$SRV.STATS` data: nats.micro has no service-level data, only per endpoint.
        self.extra_stats: Callable[[], dict] | None = None

    def endpoint(self, subject: str, request_type: type[Req], handler: Handler, *, max_concurrency: int = 256) -> None:
        self._endpoints.append(_Endpoint(subject, request_type, handler, max_concurrency))

    async def connect(self, **callbacks) -> Client:
        """Connect as this service's identity; `callbacks` are nats-py's (e.g. `disconnected_cb`).

        With unlimited reconnects nats-py also waits for a bus that is not up yet (a service started before
        NATS); `bus.on_error` logs that once a minute with a count, not once per attempt.
        """
        refusals = bus.Refusals()
        self.nc = bus.track(await nats.connect(
            self.settings.nats_servers(),
            name=self.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=refusals.note,
            **connect_options(self.settings, self.identity),
            **callbacks,
        ), refusals)
        return self.nc

    async def start(self) -> None:
        """Register the micro service and its endpoints (call once the service can answer them)."""
        assert self.nc is not None, "connect() first"
        self._service = await add_service(
            self.nc,
            ServiceConfig(
                name=self.name,
                version=self.version,
                description=self.description,
                stats_handler=self._stats,
            ),
        )
        # nats.micro times the endpoint callback, which here only starts the request's task (a few µs, never an
        # error): `$SRV.STATS` reports this module's counters instead, taken when each reply goes out.
        self._service.stats = self._true_stats(self._service.stats)
        groups: dict[str, Any] = {}
        for ep in self._endpoints:
            prefix, _, verb = ep.subject.rpartition(".")
            group = groups.setdefault(prefix, self._service.add_group(name=prefix))
            await group.add_endpoint(name=verb.replace("*", "any"), subject=verb, handler=self._dispatcher(ep))
        # nats-py writes flush()'s PING ahead of SUBs still queued; after one round trip those SUBs
        # have gone out, so the second flush returns only once the server holds every endpoint.
        await self.nc.flush()
        await self.nc.flush()
        log.info("service ready", extra={"service": self.name, "endpoints": [e.subject for e in self._endpoints]})

    def _true_stats(self, library_stats: Callable[[], ServiceStats]) -> Callable[[], ServiceStats]:
        def stats() -> ServiceStats:
            out = library_stats()
            counters = {e.subject: e.counters for e in self._endpoints}
            for endpoint in out.endpoints:
                c = counters.get(endpoint.subject)
                if c is None:
                    continue
                endpoint.num_requests, endpoint.num_errors = c.requests, c.errors
                endpoint.last_error = c.last_error or None
                endpoint.processing_time = c.processing_ns
                endpoint.average_processing_time = c.processing_ns // c.requests if c.requests else 0
            return out

        return stats

    def _stats(self, stats: EndpointStats) -> dict:
        ep = next((e for e in self._endpoints if e.subject == stats.subject), None)
        data: dict = {}
        if self.extra_stats is not None:
            try:
                data.update(self.extra_stats())
            except Exception:  # a broken figure must not cost the endpoints' own stats
                log.exception("extra stats failed", extra={"service": self.name})
        if ep is not None:
            c = ep.counters
            data.update(errors=c.errors, in_flight=c.in_flight, last_error=c.last_error, latency=c.latency.encode())
        return data

    def _dispatcher(self, ep: _Endpoint) -> Callable[[Request], Awaitable[None]]:
        async def dispatch(request: Request) -> None:
            if ep.counters.in_flight >= ep.max_concurrency:
                received_ns = time.perf_counter_ns()
                try:
                    busy = errors.Unavailable("too many requests in flight; retry later",
                                              retry_after_s=ENDPOINT_RETRY_AFTER_S)
                    await self._fail(ep, request, busy)
                finally:
                    ep.counters.finished(time.perf_counter_ns() - received_ns)
                return
            ep.counters.in_flight += 1
            task = asyncio.create_task(self._handle(ep, request, time.perf_counter_ns()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return dispatch

    async def _handle(self, ep: _Endpoint, request: Request, received_ns: int) -> None:
        try:
            headers = dict(request.headers or {})
            with tracer().start_as_current_span(ep.subject, context=extract_context(headers)) as span:
                span.set_attribute("magi.service", self.name)
                try:
                    reply = await self._call(ep, request, headers)
                except Exception as exc:  # every failure becomes a typed error reply
                    error = errors.translate(exc)
                    span.set_attribute("magi.error_code", error.code)
                    await self._fail(ep, request, error)
                    return
            await request.respond(_encoder.encode(reply))
        except Exception:
            log.exception("could not reply", extra={"subject": ep.subject})
        finally:
            ep.counters.in_flight -= 1
            ep.counters.finished(time.perf_counter_ns() - received_ns)

    async def _call(self, ep: _Endpoint, request: Request, headers: dict[str, str]) -> msgspec.Struct:
        data = request.data
        if len(data) > self.settings.max_payload:
            raise errors.PayloadTooLarge(
                f"payload of {len(data)} bytes exceeds the limit of {self.settings.max_payload} (MAGI_MAX_PAYLOAD)",
                field="$",
            )
        payload = ep.decoder.decode(data if data.strip() else b"{}")
        # nats.micro's Request exposes no reply subject; streaming endpoints need the caller's inbox.
        reply = getattr(getattr(request, "_msg", None), "reply", "") or ""
        return await ep.handler(payload, RequestContext(subject=request.subject, headers=headers, reply=reply))

    async def _fail(self, ep: _Endpoint, request: Request, error: errors.MagiError) -> None:
        ep.counters.errors += 1
        ep.counters.last_error = f"{error.code}:{error.message}"[:200]
        if error.code >= 500:
            log.warning("request failed", extra={"subject": ep.subject, "code": error.code, "error": error.message})
        await respond_error(request, error)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._service is not None:
            await self._service.stop()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()


async def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT; the service then drains and exits cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

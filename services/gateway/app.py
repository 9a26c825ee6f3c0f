"""The HTTP side of the gateway: a Starlette app whose every route is one or a few bus requests.

- Auth: `Authorization: Bearer <key>` against the keys file (401 otherwise), on every `/v1` route.
- Overload: at most `MAGI_HTTP_CONCURRENCY` requests at once (a stream counts until it ends); more get
  429 with `Retry-After`. A bus or backend that is down is 503 with `Retry-After`; a deadline is 504. A
  service that refused for load (a model's queue or the mission backlog full) sends its own retry hint,
  which becomes the `Retry-After` (mapping.retry_after).
- Streams: each choice is a streamed `magi.infer.generate` with the gateway's own `request_id`; the
  first message of each is awaited before the HTTP status is sent, so an unknown model or a prompt too
  long for the window is still a proper 404/400. A client that goes away mid-stream gets its
  generations cancelled (`magi.infer.cancel` by request id, and the inbox unsubscribed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import msgspec
from nats.aio.client import Client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protos.infer import (
    CancelReply,
    CancelRequest,
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    ModelsReply,
    StreamChunk,
)
from protos.mission import CloneResult, MissionReply, MissionRequest
from services.gateway import mapping
from services.gateway.dashboard import Dashboard
from services.gateway.heartbeats import Heartbeats
from services.gateway.keys import ApiKeys
from services.gateway.metrics import HttpMetrics, Metrics
from services.gateway.schema import ChatRequest, CompletionRequest, EmbeddingRequest
from shared import bus, errors
from shared.config import Settings

log = logging.getLogger("magi.gateway")

_encoder = msgspec.json.Encoder()
_decoders = {t: msgspec.json.Decoder(t) for t in (ChatRequest, CompletionRequest, EmbeddingRequest)}
DONE = b"data: [DONE]\n\n"
MARGIN_S = 5.0  # the bus wait beyond a generation's or mission's own deadline


def sse(obj: dict) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


def json_response(obj: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status_code=status, headers=headers, media_type="application/json")


def error_response(exc: BaseException) -> Response:
    status, body, headers = mapping.http_error(exc)
    return json_response(body, status, headers)


class EventStream(Response):
    """Server-sent events from an async iterator of encoded events. It listens for the client's
    disconnect while it streams and then stops the iterator at once (its `finally` cancels the work),
    rather than noticing only at the next write."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], None]) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        complete = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            listen = asyncio.ensure_future(self._listen(receive))
            await asyncio.wait({pump, listen}, return_when=asyncio.FIRST_COMPLETED)
            complete = pump.done() and not pump.cancelled() and pump.exception() is None
            for task in (pump, listen):
                task.cancel()
            await asyncio.gather(pump, listen, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()
            self.on_close(complete)

    async def _pump(self, send) -> None:
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _listen(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Choice:
    """One streamed generation of a request (a request with `n` choices, or several prompts, has several)."""

    index: int
    request: GenerateRequest
    stream: AsyncIterator[object] | None = None
    first: object = None
    done: bool = False
    reply: GenerateReply | None = None


@dataclass
class Counters:
    in_flight: int = 0
    served: int = 0
    rejected: int = 0
    streams: int = 0
    cancelled: int = 0
    background: set = field(default_factory=set)


class Gateway:
    def __init__(self, settings: Settings, nc: Client, keys: ApiKeys) -> None:
        self.settings = settings
        self.nc = nc
        self.keys = keys
        self.limit = settings.http_concurrency
        self.counters = Counters()
        self.created = int(time.time())
        self.generate_timeout = settings.request_timeout_s
        self.heartbeats = Heartbeats(nc)  # one subscription for the two below
        self.dashboard = Dashboard(settings, nc, keys, self.heartbeats)  # `/`: the live dashboard (its own login)
        self.metrics = Metrics(settings, nc, keys, self.counters, self.heartbeats)  # `/metrics`: Prometheus

    # ---- plumbing --------------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models", self._route(self.models, None, limited=False), methods=["GET"]),
            Route("/v1/chat/completions", self._route(self.chat, ChatRequest), methods=["POST"]),
            Route("/v1/completions", self._route(self.completions, CompletionRequest), methods=["POST"]),
            Route("/v1/embeddings", self._route(self.embeddings, EmbeddingRequest), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics.endpoint, methods=["GET"]),
            *self.dashboard.routes(),
        ]
        return Starlette(routes=routes, middleware=[Middleware(HttpMetrics, routes=self.metrics.http)],
                         exception_handlers={HTTPException: self._http_exception, Exception: self._unexpected})

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        kind = errors.NotFound if exc.status_code == 404 else errors.BadRequest
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        status, body, headers = mapping.http_error(kind(message))
        return json_response(body, exc.status_code, headers)

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        return error_response(exc)  # a generic 500; `errors.translate` logs the details

    def _release(self, complete: bool = True) -> None:
        self.counters.in_flight -= 1

    def _route(self, handler: Callable[..., Awaitable[Response]], body_type: type | None, *, limited: bool = True):
        decoder = _decoders.get(body_type) if body_type else None

        async def endpoint(request: Request) -> Response:
            if not self.keys.check(request.headers.get("authorization")):
                return error_response(mapping.Unauthorized(
                    "invalid or missing API key (Authorization: Bearer <key>; `magi up` writes one to "
                    "$MAGI_HOME/secrets/api_key)"))
            if limited and self.counters.in_flight >= self.limit:
                self.counters.rejected += 1
                return error_response(mapping.TooManyRequests(
                    f"too many requests in flight (MAGI_HTTP_CONCURRENCY={self.limit}); retry later"))
            self.counters.in_flight += 1
            handed_over = False
            try:
                payload = None
                if decoder is not None:
                    length = request.headers.get("content-length")
                    if length and length.isdigit() and int(length) > self.settings.max_payload:
                        raise errors.PayloadTooLarge(f"body over {self.settings.max_payload} bytes (MAGI_MAX_PAYLOAD)")
                    body = await request.body()
                    if len(body) > self.settings.max_payload:
                        raise errors.PayloadTooLarge(f"body over {self.settings.max_payload} bytes (MAGI_MAX_PAYLOAD)")
                    payload = decoder.decode(body)
                if not self.nc.is_connected:
                    raise errors.Unavailable("message bus unavailable")
                response = await (self._unless_client_leaves(request, handler(payload)) if decoder is not None
                                  else handler(payload))
                if isinstance(response, EventStream):
                    handed_over = True  # the stream releases its slot when it ends
                    self.counters.streams += 1
                    response.on_close = self._stream_closed
                return response
            except Exception as exc:
                return error_response(exc)
            finally:
                self.counters.served += 1
                if not handed_over:
                    self._release()

        return endpoint

    async def _unless_client_leaves(self, request: Request, work: Awaitable[Response]) -> Response:
        """Run a handler while listening for the client's disconnect (the body is read, so the next ASGI
        message is one): a client that leaves cancels the handler, and with it the generations it waits on."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.counters.cancelled += 1
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        return task.result()

    def _stream_closed(self, complete: bool) -> None:
        if not complete:
            self.counters.cancelled += 1
        self._release()

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.counters.background.add(task)
        task.add_done_callback(self.counters.background.discard)

    async def close(self) -> None:
        for task in list(self.counters.background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 2.0)

    # ---- routes ----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok" if self.nc.is_connected else "bus unavailable"},
                             200 if self.nc.is_connected else 503)

    async def models(self, _payload) -> Response:
        reply = await bus.request(self.nc, "magi.infer.models", b"{}", ModelsReply, timeout=10)
        return json_response(mapping.model_list(reply.models, self.created))

    async def embeddings(self, req: EmbeddingRequest) -> Response:
        texts = [req.input] if isinstance(req.input, str) else req.input
        reply = await bus.request(self.nc, "magi.infer.embed", EmbedRequest(texts=texts, model=req.model), EmbedReply,
                                  timeout=self.generate_timeout + MARGIN_S)
        if req.dimensions is not None and req.dimensions != reply.dim:
            raise errors.BadRequest(f"{reply.model} has {reply.dim} dimensions; it cannot give {req.dimensions}",
                                    field="dimensions")
        return json_response(mapping.embeddings(reply.model, reply.vectors, req.encoding_format, reply.prompt_tokens))

    async def chat(self, req: ChatRequest) -> Response:
        messages = mapping.chat_messages(req.messages)
        strategy = mapping.mission_strategy(req.model)
        if strategy is not None:
            if req.n != 1:
                raise errors.BadRequest("a mission gives one answer (n must be 1)", field="n")
            mission = mapping.mission_request(mapping.mission_prompt(messages), strategy, req.magi,
                                              req.max_completion_tokens or req.max_tokens)
            return await self._mission("chat", req, mission)
        mapping.check_supported(req)
        gens = [mapping.generate_request(req, index=i, request_id=self._request_id(), timeout_s=self.generate_timeout,
                                         messages=messages) for i in range(req.n)]
        return await self._generate("chat", req, gens)

    async def completions(self, req: CompletionRequest) -> Response:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        strategy = mapping.mission_strategy(req.model)
        if strategy is not None:
            if req.n != 1 or len(prompts) != 1:
                raise errors.BadRequest("a mission gives one answer (one prompt, n 1)", field="n")
            mission = mapping.mission_request(prompts[0], strategy, req.magi, req.max_tokens)
            return await self._mission("text", req, mission)
        mapping.check_supported(req)
        gens = [mapping.generate_request(req, index=i, request_id=self._request_id(), timeout_s=self.generate_timeout,
                                         prompt=p) for p in prompts for i in range(req.n)]
        return await self._generate("text", req, gens)

    @staticmethod
    def _request_id() -> str:
        return f"gw-{uuid.uuid4().hex}"

    # ---- generation ------------------------------------------------------------------------------

    async def _generate(self, kind: str, req, gens: list[GenerateRequest]) -> Response:
        cid = mapping.completion_id(kind, gens[0].request_id.removeprefix("gw-"))
        if req.stream:
            return await self._stream(kind, req, cid, gens)
        timeout = self.generate_timeout + MARGIN_S
        try:
            if len(gens) == 1:
                replies = [await bus.request(self.nc, "magi.infer.generate", gens[0], GenerateReply, timeout=timeout)]
            else:
                replies = list(await asyncio.gather(*(bus.request(self.nc, "magi.infer.generate", g, GenerateReply,
                                                                  timeout=timeout) for g in gens)))
        except asyncio.CancelledError:  # the client left: stop what it asked for
            for g in gens:
                self._background(self._cancel(g.request_id))
            raise
        build = mapping.chat_completion if kind == "chat" else mapping.text_completion
        return json_response(build(cid, req.model, replies))

    async def _open(self, choice: Choice) -> None:
        choice.stream = bus.stream_request(self.nc, "magi.infer.generate", choice.request, StreamChunk, GenerateReply,
                                           timeout=self.generate_timeout + MARGIN_S)
        choice.first = await anext(choice.stream)  # an error before the first token raises here, with its status
        if isinstance(choice.first, GenerateReply):
            choice.done, choice.reply = True, choice.first

    async def _stream(self, kind: str, req, cid: str, gens: list[GenerateRequest]) -> Response:
        choices = [Choice(index=i, request=g) for i, g in enumerate(gens)]
        opened = await asyncio.gather(*(self._open(c) for c in choices), return_exceptions=True)
        failed = next((e for e in opened if isinstance(e, BaseException)), None)
        if failed is not None:
            self._background(self._stop(choices, []))
            raise failed
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(self._events(kind, req.model, cid, choices, include_usage), self._release)

    async def _events(self, kind: str, model: str, cid: str, choices: list[Choice],
                      include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            item = choice.first
            try:
                while True:
                    await queue.put((choice, item))
                    if isinstance(item, GenerateReply):
                        return
                    item = await anext(choice.stream)
            except Exception as exc:  # an error mid-stream: reported as an SSE error event
                await queue.put((choice, exc))

        if len(choices) == 1:  # one choice: read its stream here, without a task and queue per token
            async with contextlib.aclosing(self._single(kind, model, cid, created, choices[0], include_usage)) as one:
                async for event in one:
                    yield event
            return
        pumps = [asyncio.create_task(pump(c)) for c in choices]
        try:
            if kind == "chat":
                for c in choices:
                    yield sse(mapping.chunk(kind, cid, created, model, c.index, role=True))
            left = len(choices)
            while left:
                choice, item = await queue.get()
                if isinstance(item, StreamChunk):
                    if item.text:
                        yield sse(mapping.chunk(kind, cid, created, model, choice.index, text=item.text))
                elif isinstance(item, GenerateReply):
                    choice.done, choice.reply, left = True, item, left - 1
                    yield sse(mapping.chunk(kind, cid, created, model, choice.index,
                                            finish=mapping.finish_reason(item.finish_reason)))
                else:
                    choice.done = True
                    yield sse(mapping.http_error(item)[1])
                    return
            if include_usage:
                yield sse(mapping.usage_chunk(kind, cid, created, model, mapping.usage([c.reply for c in choices])))
            yield DONE
        finally:
            self._background(self._stop(choices, pumps))

    async def _single(self, kind: str, model: str, cid: str, created: int, choice: Choice,
                      include_usage: bool) -> AsyncIterator[bytes]:
        try:
            if kind == "chat":
                yield sse(mapping.chunk(kind, cid, created, model, 0, role=True))
            item = choice.first
            while isinstance(item, StreamChunk):
                if item.text:
                    yield sse(mapping.chunk(kind, cid, created, model, 0, text=item.text))
                try:
                    item = await anext(choice.stream)
                except Exception as exc:  # an error mid-stream: reported as an SSE error event
                    choice.done = True
                    yield sse(mapping.http_error(exc)[1])
                    return
            choice.done, choice.reply = True, item
            yield sse(mapping.chunk(kind, cid, created, model, 0, finish=mapping.finish_reason(item.finish_reason)))
            if include_usage:
                yield sse(mapping.usage_chunk(kind, cid, created, model, mapping.usage([item])))
            yield DONE
        finally:
            self._background(self._stop([choice], []))

    async def _stop(self, choices: list[Choice], pumps: list[asyncio.Task]) -> None:
        """After a stream ends, however it ends: close each bus stream (unsubscribing its inbox, which the
        inference service notices at its next piece) and cancel every generation not finished."""
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for c in choices:
            if c.stream is not None:
                with contextlib.suppress(Exception):
                    await c.stream.aclose()
        for c in choices:
            if not c.done and c.stream is not None:
                await self._cancel(c.request.request_id)

    async def _cancel(self, request_id: str) -> None:
        try:
            await bus.request(self.nc, "magi.infer.cancel", CancelRequest(request_id=request_id), CancelReply,
                              timeout=5)
        except errors.MagiError as exc:
            log.warning("could not cancel a generation", extra={"request_id": request_id, "error": exc.message})

    # ---- missions --------------------------------------------------------------------------------

    async def _mission(self, kind: str, req, mission: MissionRequest) -> Response:
        cid = mapping.completion_id(kind, uuid.uuid4().hex)
        timeout = mission.deadline_s + MARGIN_S
        if not req.stream:
            reply = await bus.request(self.nc, "magi.mission.run", mission, MissionReply, timeout=timeout)
            return json_response(mapping.mission_completion(kind, cid, req.model, reply))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        progress = await self.nc.subscribe(self.nc.new_inbox())
        mission.progress_subject = progress.subject
        run = asyncio.create_task(bus.request(self.nc, "magi.mission.run", mission, MissionReply, timeout=timeout))
        return EventStream(self._mission_events(kind, req.model, cid, run, progress, include_usage), self._release)

    async def _mission_events(self, kind: str, model: str, cid: str, run: asyncio.Task, progress,
                              include_usage: bool) -> AsyncIterator[bytes]:
        """A mission streams each clone's outcome as an SSE comment (`: clone ...`, which OpenAI clients
        skip) as it finishes, then the consensus answer as one chunk and the `magi` extension on the last."""
        created = int(time.time())
        try:
            if kind == "chat":
                yield sse(mapping.chunk(kind, cid, created, model, 0, role=True))
            while not run.done():
                next_msg = asyncio.ensure_future(progress.next_msg(timeout=None))
                await asyncio.wait({run, next_msg}, return_when=asyncio.FIRST_COMPLETED)
                if next_msg.done() and not next_msg.cancelled() and next_msg.exception() is None:
                    clone = msgspec.json.decode(next_msg.result().data, type=CloneResult)
                    outcome = "ok" if clone.ok else f"failed: {clone.error}"
                    yield (f": clone {clone.clone_id} ({clone.role}, {clone.model}) {outcome} in "
                           f"{clone.latency_ms:.0f} ms\n\n").encode()
                else:
                    next_msg.cancel()
                    with contextlib.suppress(BaseException):
                        await next_msg
            try:
                reply: MissionReply = run.result()
            except Exception as exc:
                yield sse(mapping.http_error(exc)[1])
                return
            yield sse(mapping.chunk(kind, cid, created, model, 0, text=reply.consensus.answer))
            yield sse(mapping.chunk(kind, cid, created, model, 0, finish="stop",
                                    extra={"magi": mapping.mission_extension(reply)}))
            if include_usage:
                yield sse(mapping.usage_chunk(kind, cid, created, model, mapping.mission_usage(reply)))
            yield DONE
        finally:
            run.cancel()  # the mission itself goes on (its result is stored under its id)
            self._background(progress.unsubscribe())

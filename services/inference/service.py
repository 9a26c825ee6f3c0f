"""`magi.infer.*` endpoints over the replica router."""

from __future__ import annotations

import asyncio
import time
import uuid

from protos.common import Empty, Usage
from protos.infer import (
    CancelReply,
    CancelRequest,
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    ModelsReply,
)
from services.inference.live import follow_catalogue, starting_catalogue
from services.inference.reconcile import scheduler_release
from services.inference.router import Router
from services.inference.streaming import ChunkSink
from shared.config import Settings
from shared.errors import BadRequest, DeadlineExceeded, NotFound
from shared.service import MagiService, RequestContext

VERSION = "0.2.0"


def _messages(req: GenerateRequest) -> list[dict[str, str]]:
    if req.messages:
        return [{"role": m.role, "content": m.content} for m in req.messages]
    if req.prompt:
        return [{"role": "user", "content": req.prompt}]
    raise BadRequest("give `prompt` or a non-empty `messages` list", field="prompt")


def _engine_ms(out: dict) -> float:
    """The actor's time inside the engine (`engine_s`; absent when no replica ran, e.g. cancelled first)."""
    return round(out.get("engine_s", 0.0) * 1000, 2)


def _embedded(out: dict | list) -> tuple[list[list[float]], float]:
    """An actor's embed result: `{"vectors", "engine_s"}` (LlamaReplica), or bare vectors from an actor that
    does not time its engine (its engine time then reads 0)."""
    if isinstance(out, dict):
        return out["vectors"], _engine_ms(out)
    return out, 0.0


def _require_digest(pool, digest: str) -> None:
    """A request that names a digest is served only by a model whose replicas load exactly those bytes. 404, as
    for an unknown model: what the caller asked for (that model at that digest) is not served here; the caller
    did nothing wrong in form (400) and nothing here conflicts with a state the caller could change (409)."""
    if digest and digest != pool.digest:
        raise NotFound(f"model {pool.spec.name!r} is {pool.digest or 'not hashed'}, not {digest}", field="digest")


def _finish(reason: str) -> str:
    # The engine reports an abort; from the caller's side that is a cancellation.
    return "cancelled" if reason == "aborted" else reason


class InferenceEndpoints:
    def __init__(self, router: Router, settings: Settings, service: MagiService) -> None:
        self.router = router
        self.settings = settings
        self.service = service

    async def generate(self, req: GenerateRequest, ctx: RequestContext) -> GenerateReply:
        messages = _messages(req)
        pool = self.router.resolve(req.model, req.role)
        _require_digest(pool, req.digest)
        if req.request_id and req.request_id in self.router.jobs:
            raise BadRequest(f"request_id {req.request_id!r} is already running", field="request_id")
        request_id = req.request_id or uuid.uuid4().hex
        await self.router.check_fits(pool, messages, req.max_tokens)
        params = {
            "messages": messages, "max_tokens": req.max_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "stop": req.stop, "seed": req.seed, "repeat_penalty": req.repeat_penalty,
        }
        timeout = min(req.timeout_s, self.settings.request_timeout_s)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                if req.stream:
                    sink = ChunkSink(self.service.nc, req.stream_subject or ctx.reply, request_id,
                                     chosen=bool(req.stream_subject))
                    async with sink:
                        replica, out, attempts = await self.router.stream(pool, params, request_id, sink.send)
                else:
                    replica, out, attempts = await self.router.generate(pool, params, request_id)
        except TimeoutError:
            raise DeadlineExceeded(f"generation exceeded {timeout:.1f} s", field="timeout_s") from None
        usage = Usage(
            prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
            total_tokens=out["prompt_tokens"] + out["completion_tokens"],
        )
        return GenerateReply(
            text=out["text"], model=pool.spec.name, node=replica.node, replica=replica.replica_id,
            usage=usage, latency_ms=round((time.perf_counter() - started) * 1000, 2),
            finish_reason=_finish(out["finish_reason"]), request_id=request_id, attempts=attempts,
            engine_ms=_engine_ms(out),
        )

    async def cancel(self, req: CancelRequest, ctx: RequestContext) -> CancelReply:
        return CancelReply(request_id=req.request_id, cancelled=self.router.cancel(req.request_id))

    async def embed(self, req: EmbedRequest, ctx: RequestContext) -> EmbedReply:
        pool = self.router.resolve(req.model, None, embedding=True)
        _require_digest(pool, req.digest)
        tokens = await self.router.check_embed_fits(pool, req.texts)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                replica, out = await self.router.embed(pool, req.texts, uuid.uuid4().hex)
        except TimeoutError:
            raise DeadlineExceeded("embedding took too long") from None
        vectors, engine_ms = _embedded(out)
        return EmbedReply(model=pool.spec.name, dim=len(vectors[0]), vectors=vectors, node=replica.node,
                          replica=replica.replica_id, prompt_tokens=tokens, engine_ms=engine_ms)

    async def models(self, req: Empty, ctx: RequestContext) -> ModelsReply:
        return ModelsReply(models=self.router.models())


async def build(settings: Settings):
    from services.inference.ray_runtime import start_ray, stop_ray
    from services.inference.replicas import ReplicaFactory

    service = MagiService("magi-inference", VERSION, "Model replicas on Ray: generate, stream, cancel, embed, models",
                          settings)
    nc = await service.connect()  # before the replicas: the scheduler places them
    kv, catalog = await starting_catalogue(nc, settings)  # the bucket's models (seeded from the YAML once)
    start_ray(settings)
    router = Router(catalog)
    try:
        factory = ReplicaFactory(settings, nc)
        await router.start(factory, where=factory.placements, weights=factory.head_weights,
                           release=scheduler_release(nc))
    except BaseException:
        stop_ray()
        await nc.close()
        raise
    endpoints = InferenceEndpoints(router, settings, service)
    service.endpoint("magi.infer.generate", GenerateRequest, endpoints.generate)
    service.endpoint("magi.infer.cancel", CancelRequest, endpoints.cancel)
    service.endpoint("magi.infer.embed", EmbedRequest, endpoints.embed)
    service.endpoint("magi.infer.models", Empty, endpoints.models)
    service.extra_stats = router.queue_stats
    _, stop_following = follow_catalogue(router, kv, nc)  # catalogue changes applied live, autoscaling

    async def cleanup() -> None:
        await stop_following()
        await router.close()
        stop_ray()

    return service, cleanup

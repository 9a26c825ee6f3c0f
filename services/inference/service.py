"""`magi.infer.*` endpoints over the replica router."""

from __future__ import annotations

import time

from protos.common import Empty, Usage
from protos.infer import EmbedReply, EmbedRequest, GenerateReply, GenerateRequest, ModelsReply
from services.inference.catalog import load_catalog
from services.inference.pool import Router
from shared.config import Settings
from shared.errors import BadRequest
from shared.service import MagiService, RequestContext

VERSION = "0.1.0"


def _messages(req: GenerateRequest) -> list[dict[str, str]]:
    if req.messages:
        return [{"role": m.role, "content": m.content} for m in req.messages]
    if req.prompt:
        return [{"role": "user", "content": req.prompt}]
    raise BadRequest("give `prompt` or a non-empty `messages` list", field="prompt")


class InferenceEndpoints:
    def __init__(self, router: Router, settings: Settings) -> None:
        self.router = router
        self.settings = settings

    async def generate(self, req: GenerateRequest, ctx: RequestContext) -> GenerateReply:
        messages = _messages(req)
        pool = self.router.resolve(req.model, req.role)
        params = {
            "messages": messages, "max_tokens": req.max_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "stop": req.stop, "seed": req.seed,
        }
        started = time.perf_counter()
        timeout = min(req.timeout_s, self.settings.request_timeout_s)
        replica, out = await self.router.call(pool, "generate", params, timeout=timeout)
        replica.tokens += out["completion_tokens"]
        usage = Usage(
            prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"],
            total_tokens=out["prompt_tokens"] + out["completion_tokens"],
        )
        return GenerateReply(
            text=out["text"], model=pool.spec.name, node=replica.node, replica=replica.replica_id,
            usage=usage, latency_ms=round((time.perf_counter() - started) * 1000, 2),
            finish_reason=out["finish_reason"],
        )

    async def embed(self, req: EmbedRequest, ctx: RequestContext) -> EmbedReply:
        pool = self.router.resolve(req.model, None, embedding=True)
        replica, vectors = await self.router.call(pool, "embed", req.texts, timeout=self.settings.request_timeout_s)
        return EmbedReply(model=pool.spec.name, dim=len(vectors[0]), vectors=vectors, node=replica.node, replica=replica.replica_id)

    async def models(self, req: Empty, ctx: RequestContext) -> ModelsReply:
        return ModelsReply(models=self.router.models())


async def build(settings: Settings):
    from services.inference.ray_runtime import start_ray, stop_ray
    from services.inference.replica import LlamaReplica

    catalog = load_catalog(settings.models_file)
    start_ray(settings)
    router = Router(catalog)
    try:
        await router.start(LlamaReplica)
    except BaseException:
        stop_ray()
        raise
    service = MagiService("magi-inference", VERSION, "Model replicas on Ray: generate, embed, models", settings)
    endpoints = InferenceEndpoints(router, settings)
    service.endpoint("magi.infer.generate", GenerateRequest, endpoints.generate)
    service.endpoint("magi.infer.embed", EmbedRequest, endpoints.embed)
    service.endpoint("magi.infer.models", Empty, endpoints.models)
    service.extra_stats = router.queue_stats
    await service.connect()

    async def cleanup() -> None:
        await router.close()
        stop_ray()

    return service, cleanup

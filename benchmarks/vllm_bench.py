"""vLLM through MAGI vs vLLM's own `AsyncLLM` in one process, and 16 concurrent requests vs one at a time.

Runs only where vLLM and a CUDA GPU exist; elsewhere `measure_vllm` returns at once with no figures and says
why (`skip_reason`). The model is a tiny random Llama written locally (tiny_llama.py): nothing is downloaded.

- `vllm.tokens_per_s.ratio_vs_direct`: the same prompts (temperature 0, same seed and token budget), one
  request at a time, through `magi.infer.generate` on a private stack (NATS, Redis, the inference service with
  one vLLM replica) vs an `AsyncLLM` built here with the engine arguments the replica uses. The two cannot hold
  the GPU at once (each takes most of its memory), so each side runs its own phase, direct first; each phase
  has an untimed warm-up and ROUNDS rounds over the prompts. Tokens/s is the sum of completion tokens over the
  sum of the callers' wall times.
- `vllm.batch16.speedup`: 16 requests sent at once to the one replica (vLLM batches them) vs the same 16 one
  after another, both through MAGI: aggregate tokens/s, the better of ROUNDS tries each.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.stacks import inference_only
from benchmarks.tiny_llama import build_tiny_llama, prompt_words
from protos.infer import ChatMessage, GenerateReply, GenerateRequest
from services.inference.engine import GenerateParams
from services.inference.vllm_async import chat_token_ids, sampling_kwargs
from shared import bus

log = logging.getLogger("magi.bench.vllm")

MODEL = "vllm-tiny"
N_CTX, MAX_BATCH = 1024, 32
MAX_TOKENS = 128
PROMPTS = 24  # per round, one at a time
ROUNDS = 3
BURST = 16


def skip_reason() -> str:
    """Why the group cannot run here ("" when it can): vLLM missing, or no CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (the `gpu` extra)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return "no CUDA GPU"
    return ""


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt_words(i)}]


def _params(i: int) -> GenerateParams:
    return GenerateParams(messages=_messages(i), max_tokens=MAX_TOKENS, temperature=0.0, seed=0)


# ---- vLLM's own AsyncLLM ---------------------------------------------------------------------------------

def _direct_engine(model: str):
    """An AsyncLLM with the engine arguments a MAGI replica of the model gets (vllm_async.build)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, max_model_len=N_CTX, gpu_memory_utilization=0.85, max_num_seqs=MAX_BATCH,
        enable_prefix_caching=True, disable_log_stats=True))


async def _direct_one(llm, tokenizer, i: int, request_id: str) -> tuple[int, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    ids = chat_token_ids(tokenizer, _messages(i))
    final = None
    async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(**sampling_kwargs(_params(i))),
                                  request_id):
        final = out
    return len(final.outputs[0].token_ids), time.perf_counter() - started


async def _direct_phase(model: str, progress) -> tuple[int, float]:
    progress("vllm: AsyncLLM in this process")
    llm = _direct_engine(model)
    try:
        tok = llm.get_tokenizer()
        tokenizer = await tok if inspect.isawaitable(tok) else tok  # async before vLLM 0.12
        await _direct_one(llm, tokenizer, 0, "warm")
        tokens, seconds = 0, 0.0
        for r in range(ROUNDS):
            for i in range(PROMPTS):
                n, s = await _direct_one(llm, tokenizer, i, f"d{r}-{i}")
                tokens, seconds = tokens + n, seconds + s
        return tokens, seconds
    finally:
        llm.shutdown()


# ---- through MAGI ----------------------------------------------------------------------------------------

async def _magi_one(nc, i: int) -> tuple[int, float]:
    request = GenerateRequest(model=MODEL, messages=[ChatMessage(**m) for m in _messages(i)], max_tokens=MAX_TOKENS,
                              temperature=0.0, seed=0, timeout_s=600.0)
    started = time.perf_counter()
    reply = await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=600)
    return reply.usage.completion_tokens, time.perf_counter() - started


async def _burst_rate(nc, together: bool) -> float:
    started = time.perf_counter()
    if together:
        done = await asyncio.gather(*(_magi_one(nc, i) for i in range(BURST)))
    else:
        done = [await _magi_one(nc, i) for i in range(BURST)]
    return sum(n for n, _ in done) / (time.perf_counter() - started)


async def _magi_phase(model: str, progress) -> tuple[int, float, float, float]:
    """Sequential tokens and seconds; best one-at-a-time and at-once rates of BURST requests."""
    catalogue = {"models": [{"name": MODEL, "backend": "vllm", "source": model, "roles": ["heavy", "fast"],
                             "n_ctx": N_CTX, "max_batch": MAX_BATCH}]}
    async with inference_only(catalogue, progress, "magi-vllm-") as nc:
        return await _magi_rounds(nc, progress)


async def _magi_rounds(nc, progress) -> tuple[int, float, float, float]:
    await _magi_one(nc, 0)  # warm-up, not counted
    tokens, seconds, one, many = 0, 0.0, 0.0, 0.0
    for r in range(ROUNDS):
        progress(f"vllm: through MAGI, round {r + 1}/{ROUNDS}")
        for i in range(PROMPTS):
            n, s = await _magi_one(nc, i)
            tokens, seconds = tokens + n, seconds + s
        one = max(one, await _burst_rate(nc, together=False))
        many = max(many, await _burst_rate(nc, together=True))
    return tokens, seconds, one, many


async def measure_vllm(progress=lambda _m: None) -> dict[str, float]:
    """The two figures (see the module's text); {} with a "skipped: <reason>" progress line where vLLM cannot run."""
    reason = skip_reason()
    if reason:
        progress(f"vllm skipped: {reason}")
        log.info("vllm benchmark skipped", extra={"reason": reason})
        return {}
    with tempfile.TemporaryDirectory(prefix="magi-tiny-llama-") as tmp:
        model = str(build_tiny_llama(Path(tmp)))
        direct_tokens, direct_s = await _direct_phase(model, progress)
        magi_tokens, magi_s, one, many = await _magi_phase(model, progress)
    direct, magi = direct_tokens / direct_s, magi_tokens / magi_s
    log.info("vllm benchmark", extra={"direct": [direct_tokens, direct_s], "magi": [magi_tokens, magi_s],
                                      "burst": [one, many]})
    return {
        "vllm.tokens_per_s.direct": round(direct, 1),
        "vllm.tokens_per_s.magi": round(magi, 1),
        "vllm.tokens_per_s.ratio_vs_direct": round(magi / direct, 4),
        "vllm.batch16.tokens_per_s.one_at_a_time": round(one, 1),
        "vllm.batch16.tokens_per_s.at_once": round(many, 1),
        "vllm.batch16.speedup": round(many / one, 3),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure_vllm(lambda m: print("...", m, flush=True))), indent=2))

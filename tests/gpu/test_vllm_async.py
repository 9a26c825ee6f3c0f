"""vLLM's AsyncLLM behind MAGI on a CUDA GPU: token streaming, abort, batching, tensor parallelism, and the
whole path through `magi.infer.generate`.

The model is MAGI_VLLM_MODEL (a local Hugging Face folder) or, by default, a tiny Llama with random weights
and a word-level tokenizer that the test writes itself: nothing is downloaded. Its answers are noise, which
is all these tests need (they measure the serving, not the model). Tensor parallelism: test_vllm_tp.py."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from benchmarks.tiny_llama import build_tiny_llama
from services.inference.engine import GenerateParams
from tests.gpu.devices import vllm_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]




GPUS = vllm_gpus()
if not GPUS:
    pytest.skip("needs vLLM (the `gpu` extra) and a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return os.environ.get("MAGI_VLLM_MODEL") or str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def engine(model):
    from services.inference import vllm_async

    eng = vllm_async.build(model, n_ctx=1024, embedding=False, max_batch=32, gpu_memory_utilization=0.3,
                           enforce_eager=True)
    yield eng
    _run(eng.close())


def _params(max_tokens: int, i: int = 0) -> GenerateParams:
    return GenerateParams(messages=[{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}], max_tokens=max_tokens,
                          temperature=0.0, seed=0)


def _run(coro):
    return asyncio.get_event_loop_policy().get_event_loop().run_until_complete(coro)


def test_a_stream_sends_pieces_before_the_end(engine):
    async def collect():
        items, first_at, started = [], None, time.perf_counter()
        async for item in engine.stream(_params(64), "stream-1"):
            first_at = first_at or time.perf_counter() - started
            items.append(item)
        return items, first_at, time.perf_counter() - started

    items, first_at, whole = _run(collect())
    pieces, final = items[:-1], items[-1]
    assert len(pieces) >= 4 and "".join(pieces) == final.text
    assert first_at < whole / 2


def test_abort_stops_within_a_few_tokens_and_frees_the_engine(engine):
    async def aborted():
        task = asyncio.create_task(engine.generate(_params(1000), "abort-1"))
        while not engine.requests.get("abort-1") or engine.requests["abort-1"].completion_tokens < 5:
            await asyncio.sleep(0.001)
        assert engine.abort("abort-1")
        return await task

    out = _run(aborted())
    assert out.finish_reason == "aborted" and out.completion_tokens < 100 and not engine.requests
    assert _run(engine.generate(_params(4), "after-abort")).completion_tokens > 0  # still serving


def test_sixteen_at_once_beat_one_at_a_time(engine, record_property):
    async def timed(together: bool) -> float:
        started = time.perf_counter()
        if together:
            outs = await asyncio.gather(*(engine.generate(_params(64, i), f"b{i}") for i in range(16)))
        else:
            outs = [await engine.generate(_params(64, i), f"s{i}") for i in range(16)]
        return sum(o.completion_tokens for o in outs) / (time.perf_counter() - started)

    sequential, batched = _run(timed(False)), _run(timed(True))
    record_property("vllm.batch16.speedup", round(batched / sequential, 3))
    assert batched > 2 * sequential


def test_through_the_service_streams_and_cancels(model, tmp_path):
    from magi import stack
    from protos.infer import CancelReply, CancelRequest, GenerateReply, GenerateRequest, StreamChunk
    from shared import bus
    from tests.integration.private_stack import inference_stack

    catalogue = {"models": [{"name": "gpu", "backend": "vllm", "source": model, "roles": ["heavy", "fast"],
                             "n_ctx": 1024, "max_batch": 16}]}

    async def drive(state):
        nc = await stack.connect_as(state.home, state.nats_url)
        try:
            chunks, final = [], None
            request = GenerateRequest(model="gpu", prompt="w1 w2", max_tokens=48, temperature=0.0, stream=True)
            async for item in bus.stream_request(nc, "magi.infer.generate", request, StreamChunk, GenerateReply,
                                                 timeout=120):
                if isinstance(item, StreamChunk):
                    chunks.append(item)
                else:
                    final = item
            long = asyncio.create_task(bus.request(nc, "magi.infer.generate", GenerateRequest(
                model="gpu", prompt="w3", max_tokens=1000, request_id="cancel-me"), GenerateReply, timeout=120))
            await asyncio.sleep(0.5)
            await bus.request(nc, "magi.infer.cancel", CancelRequest(request_id="cancel-me"), CancelReply, timeout=10)
            return chunks, final, await long
        finally:
            await nc.close()

    with inference_stack(tmp_path, catalogue) as state:
        chunks, final, cancelled = asyncio.run(drive(state))
    assert len(chunks) >= 4 and "".join(c.text for c in chunks) == final.text
    assert cancelled.finish_reason == "cancelled" and cancelled.usage.completion_tokens < 1000

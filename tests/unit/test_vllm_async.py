"""The request bookkeeping around vLLM's AsyncLLM (services/inference/vllm_async.py), driven by a stand-in
with AsyncLLM's generate/abort behaviour: vLLM itself needs a GPU, and its own run is the `gpu` tests'."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from services.inference.engine import GenerateParams, Generation
from services.inference.vllm_async import AsyncVllmEngine, chat_token_ids
from shared.errors import BadRequest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

STEP_S = 0.002


class Tokenizer:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt, continue_final_message=False):
        self.calls.append(dict(messages=messages, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message))
        return list(range(3 * len(messages)))


class StandInLLM:
    """Like AsyncLLM.generate: one DELTA output per step; a cancelled consumer aborts the request."""

    def __init__(self) -> None:
        self.tokenizer = Tokenizer()
        self.aborted: list[str] = []
        self.running = 0
        self.most_running = 0

    def get_tokenizer(self):
        return self.tokenizer

    async def generate(self, prompt, sampling, request_id):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            n = sampling["max_tokens"]
            for i in range(n):
                await asyncio.sleep(STEP_S)
                yield SimpleNamespace(outputs=[SimpleNamespace(text=f"t{i} ", token_ids=[i],
                                                               finish_reason="length" if i == n - 1 else None)])
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self.running -= 1


def _engine() -> tuple[AsyncVllmEngine, StandInLLM]:
    llm = StandInLLM()
    return AsyncVllmEngine(llm, sampling_params=dict, tokens_prompt=lambda prompt_token_ids: prompt_token_ids), llm


def _params(max_tokens: int) -> GenerateParams:
    return GenerateParams(messages=[{"role": "user", "content": "Hi"}], max_tokens=max_tokens, temperature=0.0)


async def test_a_generation_collects_every_delta():
    engine, _ = _engine()
    out = await engine.generate(_params(5), "r1")
    assert out.text == "t0 t1 t2 t3 t4 " and out.completion_tokens == 5 and out.finish_reason == "length"
    assert out.prompt_tokens == 3 and not engine.requests


async def test_a_stream_hands_out_pieces_as_they_come_then_the_usage():
    engine, _ = _engine()
    started = time.perf_counter()
    items, first_at = [], None
    async for item in engine.stream(_params(40), "r2"):
        first_at = first_at or time.perf_counter() - started
        items.append(item)
    whole = time.perf_counter() - started
    assert [i for i in items[:-1]] == [f"t{i} " for i in range(40)] and isinstance(items[-1], Generation)
    assert first_at < whole / 4  # the first piece came long before the end


async def test_abort_stops_the_request_in_the_engine_and_reports_it():
    engine, llm = _engine()
    task = asyncio.create_task(engine.generate(_params(10_000), "r3"))
    while not engine.requests.get("r3") or len(engine.requests["r3"].text) < 3:
        await asyncio.sleep(STEP_S)
    assert engine.abort("r3")
    out = await asyncio.wait_for(task, 1)
    assert out.finish_reason == "aborted" and 3 <= out.completion_tokens < 100
    assert llm.aborted == ["r3"] and llm.running == 0
    assert not engine.abort("r3")  # gone: nothing to abort


async def test_a_stream_whose_reader_leaves_aborts_its_request():
    engine, llm = _engine()
    stream = engine.stream(_params(10_000), "r4")
    assert (await stream.__anext__()).startswith("t0")
    await stream.aclose()
    await asyncio.sleep(10 * STEP_S)
    assert llm.aborted == ["r4"] and llm.running == 0 and not engine.requests
    assert (await engine.generate(_params(2), "r4")).completion_tokens == 2  # the id is free again


async def test_concurrent_requests_run_together_in_the_engine():
    engine, llm = _engine()
    outs = await asyncio.gather(*(engine.generate(_params(20), f"c{i}") for i in range(16)))
    assert llm.most_running == 16 and all(o.completion_tokens == 20 for o in outs)


async def test_a_request_id_runs_once_at_a_time():
    engine, _ = _engine()
    task = asyncio.create_task(engine.generate(_params(50), "dup"))
    await asyncio.sleep(5 * STEP_S)
    with pytest.raises(BadRequest):
        await engine.generate(_params(5), "dup")
    engine.abort("dup")
    assert (await task).finish_reason == "aborted"


async def test_a_cancelled_caller_aborts_and_forgets_its_request():
    engine, llm = _engine()
    task = asyncio.create_task(engine.generate(_params(10_000), "gone"))
    await asyncio.sleep(5 * STEP_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(5 * STEP_S)
    assert llm.aborted == ["gone"] and not engine.requests


def test_the_chat_template_opens_a_turn_or_continues_the_answer():
    tok = Tokenizer()
    messages = [{"role": "user", "content": "Hi"}]
    chat_token_ids(tok, messages)
    chat_token_ids(tok, messages, prefix="Hello, I")
    fresh, continued = tok.calls
    assert fresh["add_generation_prompt"] and not fresh["continue_final_message"]
    assert continued["messages"][-1] == {"role": "assistant", "content": "Hello, I"}
    assert continued["continue_final_message"] and not continued["add_generation_prompt"]

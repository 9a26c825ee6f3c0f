"""The vLLM benchmark group (benchmarks/vllm_bench.py) on a machine that cannot run vLLM: it returns at once
with no figures and says why, so `just bench` goes on with the other groups."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks import vllm_bench
from benchmarks.tiny_llama import VOCAB_WORDS, prompt_words

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.mark.skipif(not vllm_bench.skip_reason(), reason="vLLM and a GPU are here: the group really runs")
def test_without_vllm_or_a_gpu_the_group_is_skipped_at_once_saying_why():
    said: list[str] = []
    started = time.perf_counter()
    assert asyncio.run(vllm_bench.measure_vllm(said.append)) == {}
    assert time.perf_counter() - started < 5
    assert said == [f"vllm skipped: {vllm_bench.skip_reason()}"] and vllm_bench.skip_reason()


def test_prompts_use_only_words_the_tiny_tokenizer_knows_and_differ():
    prompts = [prompt_words(i) for i in range(vllm_bench.PROMPTS)]
    assert len(set(prompts)) == len(prompts)
    assert all(0 <= int(w[1:]) < VOCAB_WORDS and w.startswith("w") for p in prompts for w in p.split())

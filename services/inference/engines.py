"""One place that turns a catalogue backend name into an engine."""

from __future__ import annotations

from pathlib import Path

from services.inference.engine import Engine, LlamaCppEngine
from services.inference.vllm_engine import VllmEngine  # imports vllm only in load()
from shared.errors import NotFound

BACKENDS = ("llama_cpp", "vllm")


def make_engine(backend: str, model_path: str, *, n_ctx: int, threads: int, embedding: bool, max_batch: int = 1,
                **extra) -> Engine:
    """An unloaded engine; `extra` goes to the backend (for vllm: gpu_memory_utilization, LLM kwargs).
    `max_batch` > 1 (llama_cpp generation only, checked by the catalogue) decodes that many requests together."""
    if backend == "llama_cpp" and max_batch > 1:
        from services.inference.batched import BatchedLlamaCppEngine

        return BatchedLlamaCppEngine(Path(model_path), n_ctx=n_ctx, threads=threads, max_batch=max_batch, **extra)
    if backend == "llama_cpp":
        return LlamaCppEngine(Path(model_path), n_ctx=n_ctx, threads=threads, embedding=embedding, **extra)
    if backend == "vllm":
        # threads is a CPU knob; vLLM sizes itself by GPU memory instead.
        return VllmEngine(model_path, n_ctx=n_ctx, embedding=embedding, **extra)
    raise NotFound(f"unknown inference backend {backend!r}; known: {', '.join(BACKENDS)}", field="backend")

"""One place that turns a catalogue backend name into an engine."""

from __future__ import annotations

from pathlib import Path

from services.inference.engine import Engine, LlamaCppEngine
from shared.errors import BadRequest, NotFound

BACKENDS = ("llama_cpp", "vllm")


def make_engine(backend: str, model_path: str, *, n_ctx: int, threads: int, embedding: bool, max_batch: int = 1,
                **extra) -> Engine:
    """An unloaded llama.cpp engine; `extra` goes to it (RPC shards, GPU offload, KV layout). `max_batch` > 1
    (generation only, checked by the catalogue) decodes that many requests together. vLLM has no engine here:
    its replicas are async actors around one AsyncLLM each (vllm_replica.py)."""
    if backend == "llama_cpp" and max_batch > 1:
        from services.inference.batched import BatchedLlamaCppEngine

        return BatchedLlamaCppEngine(Path(model_path), n_ctx=n_ctx, threads=threads, max_batch=max_batch, **extra)
    if backend == "llama_cpp":
        return LlamaCppEngine(Path(model_path), n_ctx=n_ctx, threads=threads, embedding=embedding, **extra)
    if backend == "vllm":
        raise BadRequest("vllm models run in VllmReplica actors (services/inference/vllm_replica.py), not in a "
                         "threaded engine", field="backend")
    raise NotFound(f"unknown inference backend {backend!r}; known: {', '.join(BACKENDS)}", field="backend")

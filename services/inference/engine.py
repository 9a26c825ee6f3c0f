"""The engine interface (load / generate / stream / embed / abort / close), apart from Ray and NATS.

Engine methods block; callers run them in a Ray actor or a worker thread, never on an event loop.
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass
class GenerateParams:
    messages: list[dict[str, str]]
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float


class Engine(abc.ABC):
    @abc.abstractmethod
    def load(self) -> None: ...

    @abc.abstractmethod
    def generate(self, params: GenerateParams) -> Generation: ...

    @abc.abstractmethod
    def stream(self, params: GenerateParams) -> Iterator[str]: ...

    @abc.abstractmethod
    def embed(self, texts: list[str]) -> list[list[float]]: ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop the generation in progress at the next token (safe to call from another thread)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class LlamaCppEngine(Engine):
    """llama-cpp-python on the CPU (or whatever ggml backend the wheel was built with)."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, embedding: bool = False) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.threads = threads
        self.embedding = embedding
        self._llm = None
        self._abort = threading.Event()

    def load(self) -> None:
        import llama_cpp

        kwargs = dict(n_ctx=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
        if self.embedding:
            # A causal LM has no pooling of its own; mean pooling gives one vector per text.
            kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        self._llm = llama_cpp.Llama(model_path=str(self.model_path), **kwargs)

    def _abort_processor(self, _input_ids, logits):
        # llama-cpp-python's chat API has no stopping criteria; once aborted, only end-of-sequence
        # stays possible, so generation ends at the very next token.
        if self._abort.is_set():
            logits[:] = float("-inf")
            logits[self._llm.token_eos()] = 0.0
        return logits

    def _completion(self, params: GenerateParams, *, stream: bool):
        import llama_cpp

        self._abort.clear()
        return self._llm.create_chat_completion(
            messages=params.messages,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop or None,
            seed=params.seed,
            stream=stream,
            logits_processor=llama_cpp.LogitsProcessorList([self._abort_processor]),
        )

    def generate(self, params: GenerateParams) -> Generation:
        started = time.perf_counter()
        out = self._completion(params, stream=False)
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Generation(
            text=choice["message"]["content"] or "",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason="aborted" if self._abort.is_set() else (choice.get("finish_reason") or ""),
            seconds=time.perf_counter() - started,
        )

    def stream(self, params: GenerateParams) -> Iterator[str]:
        for chunk in self._completion(params, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not self.embedding:
            raise RuntimeError("this engine was not loaded for embeddings")
        return self._llm.embed(texts, normalize=True)

    def abort(self) -> None:
        self._abort.set()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

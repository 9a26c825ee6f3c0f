"""The engine interface (load / generate / stream / embed / abort / close), apart from Ray and NATS.

Engine methods block; callers run them in a Ray actor or a worker thread, never on an event loop.
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator


def gpu_offload(n_gpu_layers: int = 0, main_gpu: int = 0, tensor_split: list[float] | None = None) -> dict:
    """The catalogue's GPU offload as `llama_cpp.Llama` keywords; none at all when nothing is offloaded, so a
    CPU replica is built exactly as before. An empty tensor_split is left to llama.cpp (one GPU: main_gpu's)."""
    if not n_gpu_layers:
        return {}
    offload: dict = dict(n_gpu_layers=n_gpu_layers, main_gpu=main_gpu)
    if tensor_split:
        offload["tensor_split"] = list(tensor_split)
    return offload


# Tokens one embedding text may have (llama.cpp batch size; capped by n_ctx). Longer texts would be cut
# silently by llama-cpp-python, so the service refuses them first (context.py).
EMBED_BATCH = 512


@dataclass
class GenerateParams:
    messages: list[dict[str, str]]
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repeat_penalty: float = 1.0


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
    def stream(self, params: GenerateParams, prefix: str = "") -> Generator[str, None, Generation]:
        """Yield the answer piece by piece and return its `Generation` (text is what was yielded).

        `prefix` is the start of the answer already produced elsewhere (by a replica that died):
        generation continues right after it, and the prefix itself is not yielded again.
        """

    @abc.abstractmethod
    def embed(self, texts: list[str]) -> list[list[float]]: ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop the generation in progress at the next token (safe to call from another thread)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class LlamaCppEngine(Engine):
    """llama-cpp-python on the CPU (or whatever ggml backend the wheel was built with)."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, embedding: bool = False,
                 rpc_servers: list[str] | None = None, n_gpu_layers: int = 0, main_gpu: int = 0,
                 tensor_split: list[float] | None = None) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.threads = threads
        self.embedding = embedding
        self.rpc_servers = list(rpc_servers or [])  # "host:port" shards holding the layers (rpc.py)
        self.offload = gpu_offload(n_gpu_layers, main_gpu, tensor_split)
        self.placement: dict[str, int] = {}  # layers per shard once loaded on shards
        self._llm = None
        self._abort = threading.Event()

    def llama_kwargs(self) -> dict:
        """What `llama_cpp.Llama(...)` is built with, besides the model path."""
        import llama_cpp

        kwargs = dict(n_ctx=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads, verbose=False,
                      **self.offload)
        if self.embedding:
            # A causal LM has no pooling of its own; mean pooling gives one vector per text.
            kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_batch=EMBED_BATCH)
        return kwargs

    def load(self) -> None:
        kwargs = self.llama_kwargs()
        if self.rpc_servers:
            from services.inference import rpc

            self._llm, self.placement = rpc.load_on_shards(
                _ContinuableLlama, self.rpc_servers, model_path=str(self.model_path), **kwargs)
            return
        self._llm = _ContinuableLlama(model_path=str(self.model_path), **kwargs)

    def _abort_processor(self, _input_ids, logits):
        # llama-cpp-python's chat API has no stopping criteria; once aborted, only end-of-sequence
        # stays possible, so generation ends at the very next token.
        if self._abort.is_set():
            logits[:] = float("-inf")
            logits[self._llm.token_eos()] = 0.0
        return logits

    def _completion(self, params: GenerateParams, *, stream: bool, prefix: str = ""):
        import llama_cpp

        self._abort.clear()
        # Evaluate every prompt from scratch instead of reusing the previous request's matching prefix:
        # a different batch split changes the float sums, and a small model at temperature 0 then picks
        # other tokens, so the same request would answer differently on replicas with other histories.
        self._llm.reset()
        self._llm.continue_with = self._llm.tokenize(prefix.encode(), add_bos=False, special=False) if prefix else []
        return self._llm.create_chat_completion(
            messages=params.messages,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop or None,
            seed=params.seed,
            repeat_penalty=params.repeat_penalty,
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

    def stream(self, params: GenerateParams, prefix: str = "") -> Generator[str, None, Generation]:
        started = time.perf_counter()
        pieces: list[str] = []
        finish = ""
        for chunk in self._completion(params, stream=True, prefix=prefix):
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            piece = choice["delta"].get("content")
            if piece:
                pieces.append(piece)
                yield piece
        return Generation(
            text="".join(pieces), prompt_tokens=self._llm.last_prompt_tokens, completion_tokens=len(pieces),
            finish_reason="aborted" if self._abort.is_set() else finish, seconds=time.perf_counter() - started,
        )

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


def _continuable_llama_class():
    import llama_cpp

    class ContinuableLlama(llama_cpp.Llama):
        """`create_chat_completion` renders the chat with the model's own template and then calls
        `create_completion` with the prompt's tokens. Appending the tokens of an answer's start there
        continues that answer exactly where another replica stopped, with the same chat template."""

        continue_with: list[int] = []
        last_prompt_tokens: int = 0

        def create_completion(self, prompt, *args, **kwargs):
            if isinstance(prompt, list):
                self.last_prompt_tokens = len(prompt)
                prompt = prompt + self.continue_with
            return super().create_completion(prompt, *args, **kwargs)

    return ContinuableLlama


def _ContinuableLlama(**kwargs):
    # Built lazily: importing llama_cpp loads its shared library, which only replicas need.
    return _continuable_llama_class()(**kwargs)

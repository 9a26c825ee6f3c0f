"""vLLM behind the engine interface, through its offline `LLM` API (GPU nodes only).

vllm is imported inside `load()` so that this module, and the catalogue that names the backend,
import on machines without it; a missing install surfaces as `Unavailable`, not an ImportError.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from typing import Generator

from services.inference.engine import Engine, GenerateParams, Generation
from shared.errors import BadRequest, Unavailable

log = logging.getLogger("magi.inference.vllm")


class VllmEngine(Engine):
    def __init__(self, model_path_or_name: str, *, n_ctx: int, gpu_memory_utilization: float = 0.85,
                 embedding: bool = False, **engine_kwargs) -> None:
        self.model = str(model_path_or_name)
        self.n_ctx = n_ctx
        self.gpu_memory_utilization = gpu_memory_utilization
        self.embedding = embedding
        self.engine_kwargs = engine_kwargs
        self._llm = None
        self._sampling_params = None
        self._abort = threading.Event()

    def load(self) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise Unavailable(
                f"the vllm backend needs vLLM, which is not installed ({exc}); "
                "install the `gpu` extra on a CUDA node: pip install 'magi[gpu]'",
                field="backend",
            ) from None
        kwargs = dict(max_model_len=self.n_ctx, gpu_memory_utilization=self.gpu_memory_utilization)
        if self.embedding:
            # One vLLM instance runs one kind of model runner; embeddings need the pooling one.
            kwargs["runner"] = "pooling"
        kwargs.update(self.engine_kwargs)
        self._sampling_params = SamplingParams
        self._llm = LLM(model=self.model, **kwargs)

    def _sampling(self, params: GenerateParams):
        return self._sampling_params(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            stop=params.stop or None, seed=params.seed, repetition_penalty=params.repeat_penalty,
        )

    def generate(self, params: GenerateParams, prefix: str = "") -> Generation:
        if self._llm is None:
            raise Unavailable("vLLM engine is not loaded")
        self._abort.clear()
        started = time.perf_counter()
        messages, chat_kwargs = params.messages, {}
        if prefix:
            # The answer's start, produced by a replica that died, becomes an open assistant turn
            # that the model continues instead of beginning a new one.
            messages = [*messages, {"role": "assistant", "content": prefix}]
            chat_kwargs = dict(add_generation_prompt=False, continue_final_message=True)
        # LLM.chat applies the model's own chat template, as llama.cpp's create_chat_completion does.
        out = self._llm.chat(messages, self._sampling(params), use_tqdm=False, **chat_kwargs)[0]
        completion = out.outputs[0]
        return Generation(
            text=completion.text,
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=len(completion.token_ids),
            finish_reason="aborted" if self._abort.is_set() else (completion.finish_reason or ""),
            seconds=time.perf_counter() - started,
        )

    def stream(self, params: GenerateParams, prefix: str = "") -> Generator[str, None, Generation]:
        # The offline LLM has no token streaming: it returns finished requests only, so the whole
        # continuation comes as one piece. Token streaming would need vLLM's AsyncLLMEngine.
        generation = self.generate(params, prefix)
        if generation.text:
            yield generation.text
        return generation

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not self.embedding:
            raise BadRequest(f"{self.model} was loaded for generation, not embeddings", field="model")
        if self._llm is None:
            raise Unavailable("vLLM engine is not loaded")
        return [list(o.outputs.embedding) for o in self._llm.embed(texts, use_tqdm=False)]

    def abort(self) -> None:
        # Best effort: LLM.chat runs its own step loop to completion and cannot be interrupted from
        # another thread, so the generation finishes and is reported as aborted.
        self._abort.set()

    def close(self) -> None:
        if self._llm is None:
            return
        del self._llm
        self._llm = None
        # vLLM keeps a process group and cached CUDA blocks alive past the LLM object.
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        log.info("vllm engine closed", extra={"model": self.model})

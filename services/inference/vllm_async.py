"""vLLM on GPU nodes through `AsyncLLM` (vLLM's V1 engine; `AsyncLLMEngine` is now its alias).

One `AsyncLLM` per replica serves every request the router sends it at once: vLLM batches them itself
(continuous batching, prefix caching), so the replica's actor is an async Ray actor with as many
concurrent calls as the catalogue's `max_batch` allows, all on one event loop.

Each request is one task pumping `AsyncLLM.generate` (output kind DELTA: each output holds only the new
text) into a queue that `generate` drains whole and `stream` hands out piece by piece. Aborting cancels
that task: `AsyncLLM.generate` then aborts the request in the engine core (its documented path for a
caller that went away), so the GPU stops working on it within a step, and the answer so far is returned
with finish reason `aborted`. vLLM is imported only when an engine is built, so this module imports on
machines without it.

The chat template is applied here with the model's own tokenizer and the prompt passed as token ids: the
template already holds the BOS token, and vLLM adds none to token ids (a string prompt would get two).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from services.inference.engine import GenerateParams, Generation
from shared.errors import BadRequest, Unavailable

log = logging.getLogger("magi.inference.vllm")

_DONE = object()


@dataclass
class _Request:
    """One generation: the pieces produced so far and how it ended."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    aborted: bool = False
    started: float = field(default_factory=time.perf_counter)


def sampling_kwargs(params: GenerateParams) -> dict[str, Any]:
    """`SamplingParams` for a request, streaming deltas (the caller adds `output_kind`)."""
    return dict(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                stop=params.stop or None, seed=params.seed, repetition_penalty=params.repeat_penalty)


def chat_token_ids(tokenizer, messages: list[dict[str, str]], prefix: str = "") -> list[int]:
    """The chat prompt as token ids; with `prefix` (an answer's start produced by a replica that died) the
    assistant turn is left open so the model continues it instead of beginning again."""
    if prefix:
        return list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": prefix}],
                                                  tokenize=True, continue_final_message=True,
                                                  add_generation_prompt=False))
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


class AsyncVllmEngine:
    """The request bookkeeping around one `AsyncLLM` (`llm`): start, stream, abort, embed, close."""

    def __init__(self, llm, *, sampling_params, tokens_prompt, pooling_params=None, embedding: bool = False) -> None:
        self.llm = llm
        self._sampling = sampling_params  # builds vllm's SamplingParams streaming deltas (see `build`)
        self._tokens_prompt = tokens_prompt  # vllm.inputs.TokensPrompt
        self._pooling = pooling_params
        self.embedding = embedding
        self.requests: dict[str, _Request] = {}
        self._tokenizer = None

    async def tokenizer(self):
        if self._tokenizer is None:
            tok = self.llm.get_tokenizer()  # async before vLLM 0.12, plain since
            self._tokenizer = await tok if inspect.isawaitable(tok) else tok
        return self._tokenizer

    async def start(self, params: GenerateParams, request_id: str, prefix: str = "") -> _Request:
        if request_id in self.requests:
            raise BadRequest(f"request {request_id!r} is already running", field="request_id")
        if self.embedding:
            raise BadRequest("this replica serves embeddings, not generations", field="model")
        ids = chat_token_ids(await self.tokenizer(), params.messages, prefix)
        sampling = self._sampling(**sampling_kwargs(params))
        request = self.requests[request_id] = _Request(prompt_tokens=len(ids))
        request.task = asyncio.create_task(self._pump(request, self._tokens_prompt(prompt_token_ids=ids), sampling,
                                                      request_id), name=f"vllm:{request_id}")
        return request

    async def _pump(self, request: _Request, prompt, sampling, request_id: str) -> None:
        try:
            async for out in self.llm.generate(prompt, sampling, request_id):
                delta = out.outputs[0]
                request.completion_tokens += len(delta.token_ids)
                if delta.text:
                    request.text.append(delta.text)
                    request.queue.put_nowait(delta.text)
                if delta.finish_reason:
                    request.finish_reason = delta.finish_reason
        except asyncio.CancelledError:
            request.aborted = True  # AsyncLLM.generate aborted it in the engine on the way out
        except Exception as exc:  # the caller gets it from `finish`
            request.queue.put_nowait(exc)
        finally:
            request.queue.put_nowait(_DONE)

    async def pieces(self, request_id: str) -> AsyncIterator[str]:
        """The request's text as it comes; ends when it finished or was aborted."""
        request = self.requests[request_id]
        while True:
            item = await request.queue.get()
            if item is _DONE:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def finish(self, request_id: str) -> Generation:
        request = self.requests.pop(request_id)
        reason = "aborted" if request.aborted else (request.finish_reason or "stop")
        return Generation(text="".join(request.text), prompt_tokens=request.prompt_tokens,
                          completion_tokens=request.completion_tokens, finish_reason=reason,
                          seconds=time.perf_counter() - request.started)

    async def generate(self, params: GenerateParams, request_id: str) -> Generation:
        await self.start(params, request_id)
        try:
            async for _ in self.pieces(request_id):
                pass
        except BaseException:  # the caller went away, or the engine failed
            self._drop(request_id)
            raise
        return self.finish(request_id)

    async def stream(self, params: GenerateParams, request_id: str, prefix: str = "") -> AsyncIterator[Any]:
        """Each piece, then the `Generation`; a consumer that stops early aborts the request."""
        await self.start(params, request_id, prefix)
        try:
            async for piece in self.pieces(request_id):
                yield piece
        except BaseException:  # GeneratorExit: the reader left
            self._drop(request_id)
            raise
        yield self.finish(request_id)

    def _drop(self, request_id: str) -> None:
        self.abort(request_id)
        self.requests.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        """Stop the request at vLLM's next step; False when it is not running here."""
        request = self.requests.get(request_id)
        if request is None or request.task is None or request.task.done():
            return False
        request.task.cancel()
        return True

    async def embed(self, texts: list[str], request_id: str) -> list[list[float]]:
        if not self.embedding:
            raise BadRequest("this replica serves generations, not embeddings", field="model")

        async def one(i: int, text: str) -> list[float]:
            final = None
            async for out in self.llm.encode(text, self._pooling_params(), f"{request_id}-{i}"):
                final = out
            data = final.outputs.data  # a tensor (PoolingOutput)
            return [float(x) for x in (data.tolist() if hasattr(data, "tolist") else data)]

        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))

    def _pooling_params(self):
        try:
            return self._pooling(task="embed")  # vLLM >= 0.10.2 names the pooling task
        except TypeError:
            return self._pooling()

    async def close(self) -> None:
        for request_id in list(self.requests):
            self.abort(request_id)
        with contextlib.suppress(Exception):
            self.llm.shutdown()


def executor_backend(tensor_parallel_size: int, placement_group=None) -> str | None:
    """vLLM's distributed executor: Ray's inside a placement group spanning nodes (tp_groups.py), vLLM's own
    worker processes for several GPUs of one node, none (one process) for one GPU."""
    if placement_group is not None:
        return "ray"
    return "mp" if tensor_parallel_size > 1 else None


def build(model: str, *, n_ctx: int, embedding: bool, max_batch: int, tensor_parallel_size: int = 1,
          gpu_memory_utilization: float = 0.85, pooling: str = "MEAN", placement_group=None,
          **engine_kwargs) -> AsyncVllmEngine:
    """An `AsyncVllmEngine` over a new `AsyncLLM` (vLLM >= 0.11); Unavailable where vLLM is not installed.
    `placement_group`: the Ray group whose GPU bundles hold the tensor-parallel workers (tp_groups.py)."""
    try:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise Unavailable(f"the vllm backend needs vLLM, which is not installed ({exc}); install the `gpu` extra "
                          "on a CUDA node: pip install 'magi[gpu]'", field="backend") from None
    kwargs: dict[str, Any] = dict(model=model, max_model_len=n_ctx, gpu_memory_utilization=gpu_memory_utilization,
                                  max_num_seqs=max_batch, tensor_parallel_size=tensor_parallel_size,
                                  distributed_executor_backend=executor_backend(tensor_parallel_size,
                                                                                placement_group),
                                  enable_prefix_caching=not embedding, disable_log_stats=True)
    if embedding:
        # The same pooling as the llama.cpp path (mean over the tokens, normalised), so vectors from either
        # backend compare; vLLM's own default for a causal LM pools the last token.
        from vllm.config import PoolerConfig

        # `override_pooler_config` was renamed `pooler_config` (vLLM 0.12).
        names = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        key = "pooler_config" if "pooler_config" in names else "override_pooler_config"
        kwargs.update({"runner": "pooling", key: PoolerConfig(pooling_type=pooling, normalize=True)})
    kwargs.update(engine_kwargs)
    llm = _async_llm(AsyncLLM, AsyncEngineArgs(**kwargs), placement_group)
    def delta_sampling(**kw) -> SamplingParams:
        return SamplingParams(**kw, output_kind=RequestOutputKind.DELTA)

    return AsyncVllmEngine(llm, sampling_params=delta_sampling, tokens_prompt=TokensPrompt,
                           pooling_params=PoolingParams, embedding=embedding)


def _async_llm(async_llm, args, placement_group):
    """The engine; with a placement group, the group is set in the engine's parallel config, which
    `initialize_ray_cluster` (vllm/v1/executor/ray_utils.py) uses before looking for a current group: the
    engine core runs in a child process, a Ray driver of its own that is in no group."""
    if placement_group is None:
        return async_llm.from_engine_args(args)
    config = args.create_engine_config()
    config.parallel_config.placement_group = placement_group
    return async_llm.from_vllm_config(config, disable_log_stats=args.disable_log_stats)

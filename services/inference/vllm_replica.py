"""A vLLM replica as an async Ray actor: one `AsyncLLM` (vllm_async.py) serving every request the router
sends it at once, on one event loop; vLLM batches them. Same methods as `LlamaReplica`, so the router,
keeper and follower treat both alike. Its GPUs come from Ray (`num_gpus` = the catalogue's
`tensor_parallel_size`), which sets CUDA_VISIBLE_DEVICES before vLLM starts its workers; a replica whose
tensor-parallel workers span nodes holds no GPU itself and runs in a placement group whose bundles hold them
(`ray_executor`, tp_groups.py).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict

import ray

import services.inference.ray_runtime  # noqa: F401  (confines Ray to loopback before import)
from services.inference import tp_groups, vllm_async
from services.inference.engine import GenerateParams, Generation


@ray.remote
class VllmReplica:
    def __init__(self, replica_id: str, model_path: str, n_ctx: int, threads: int, embedding: bool,
                 backend: str = "vllm", rpc_servers: list[str] | None = None, max_batch: int = 1,
                 kv_unified: bool = False, tensor_parallel_size: int = 1, ray_executor: bool = False) -> None:
        self.replica_id = replica_id
        self.node = os.environ.get("MAGI_NODE_NAME") or socket.gethostname()
        self.embedding = embedding
        group = tp_groups.prepare_driver() if ray_executor else None
        self.engine = vllm_async.build(model_path, n_ctx=n_ctx, embedding=embedding, max_batch=max_batch,
                                       tensor_parallel_size=tensor_parallel_size, placement_group=group)

    async def warmup(self) -> dict:
        """Ready means a real generation (or embedding) went through, not just a live process."""
        if self.embedding:
            await self.engine.embed(["warm up"], f"warmup-{self.replica_id}")
        else:
            await self.engine.generate(GenerateParams(messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                                      temperature=0.0), f"warmup-{self.replica_id}")
        return {"replica": self.replica_id, "node": self.node, "pid": os.getpid()}

    async def generate(self, params: dict, request_id: str) -> dict:
        """The `Generation` as a dict, with `engine_s` (here: the request's time in vLLM, queue included)."""
        out = await self.engine.generate(GenerateParams(**params), request_id)
        return dict(asdict(out), engine_s=out.seconds)

    @ray.method(num_returns="streaming")
    async def stream(self, params: dict, request_id: str, prefix: str = ""):
        """`{"piece": text}` per piece, then one dict with usage, as `LlamaReplica.stream`."""
        async for item in self.engine.stream(GenerateParams(**params), request_id, prefix):
            yield dict(asdict(item), engine_s=item.seconds) if isinstance(item, Generation) else {"piece": item}

    async def embed(self, texts: list[str], request_id: str) -> dict:
        started = time.perf_counter()
        vectors = await self.engine.embed(texts, request_id)
        return {"vectors": vectors, "engine_s": time.perf_counter() - started}

    async def ping(self) -> int:
        return os.getpid()  # answers mid-generation: every call shares the loop, none blocks it

    async def abort(self, request_id: str) -> None:
        if request_id:
            self.engine.abort(request_id)

    async def close(self) -> None:
        await self.engine.close()

"""A model replica as a Ray actor: it owns one engine and serves one request at a time, or up to
`max_batch` at once when the engine batches (batched.py; the actor is then created with that much
concurrency: `ModelSpec.actor_concurrency`).

`abort` and `stats` run in a separate concurrency group so they answer while a generation runs.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict

import ray

import services.inference.ray_runtime  # noqa: F401  (confines Ray to loopback before import)
from services.inference.engine import GenerateParams
from services.inference.engines import make_engine


@ray.remote(concurrency_groups={"control": 1})
class LlamaReplica:
    def __init__(self, replica_id: str, model_path: str, n_ctx: int, threads: int, embedding: bool,
                 backend: str = "llama_cpp", rpc_servers: list[str] | None = None, max_batch: int = 1,
                 kv_unified: bool = False, n_gpu_layers: int = 0, main_gpu: int = 0,
                 tensor_split: list[float] | None = None) -> None:
        self.replica_id = replica_id
        self.node = os.environ.get("MAGI_NODE_NAME") or socket.gethostname()
        # rpc_servers: "host:port" shards (RpcShard actors) that hold the layers; llama_cpp only.
        extra = {"rpc_servers": rpc_servers} if rpc_servers else {}
        if max_batch > 1:
            extra["kv_unified"] = kv_unified
        if n_gpu_layers:  # GPU offload (catalogue n_gpu_layers); Ray gave this actor its GPUs (replicas.py)
            extra.update(n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, tensor_split=tensor_split)
        self.engine = make_engine(backend, model_path, n_ctx=n_ctx, threads=threads, embedding=embedding,
                                  max_batch=max_batch, **extra)
        self.engine.load()
        self.batched = max_batch > 1  # calls run side by side; each is known to the engine by request id
        self.current = ""

    def warmup(self) -> dict:
        """Ready means a real generation (or embedding) went through, not just a live process."""
        if self.engine.embedding:
            self.engine.embed(["warm up"])
        else:
            self.engine.generate(GenerateParams(messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0.0))
        return {"replica": self.replica_id, "node": self.node, "pid": os.getpid()}

    def generate(self, params: dict, request_id: str) -> dict:
        """The `Generation` as a dict, with `engine_s`: the seconds spent inside the engine call."""
        started = time.perf_counter()
        if self.batched:
            out = asdict(self.engine.generate(GenerateParams(**params), request_id=request_id))
            return dict(out, engine_s=time.perf_counter() - started)
        self.current = request_id
        try:
            out = asdict(self.engine.generate(GenerateParams(**params)))
            return dict(out, engine_s=time.perf_counter() - started)
        finally:
            self.current = ""

    @ray.method(num_returns="streaming")
    def stream(self, params: dict, request_id: str, prefix: str = ""):
        """Yield `{"piece": text}` per piece, then one dict with usage; `prefix` is text already sent
        by a replica that died, which this one continues after. The last dict's `engine_s` counts the time
        inside the engine only, not the time the consumer took to take each piece."""
        if self.batched:
            yield from _items(self.engine.stream(GenerateParams(**params), prefix=prefix, request_id=request_id))
            return
        self.current = request_id
        try:
            yield from _items(self.engine.stream(GenerateParams(**params), prefix=prefix))
        finally:
            self.current = ""

    def embed(self, texts: list[str], request_id: str) -> dict:
        """`{"vectors": [...], "engine_s": seconds inside the engine}`."""
        started = time.perf_counter()
        vectors = self.engine.embed(texts)
        return {"vectors": vectors, "engine_s": time.perf_counter() - started}

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        """Answers even mid-generation (control group): the service's liveness check."""
        return os.getpid()

    @ray.method(concurrency_group="control")
    def abort(self, request_id: str) -> None:
        """Abort only the named request: by the time this arrives another one may be running."""
        if self.batched:
            if request_id:
                self.engine.abort(request_id)
        elif request_id and request_id == self.current:
            self.engine.abort()

    def close(self) -> None:
        self.engine.close()


def _items(pieces):
    """An engine stream as the actor's items: `{"piece": text}` each, then the usage dict with `engine_s`,
    the seconds spent in the engine (each `next`), not those spent handing pieces to the caller."""
    engine_s = 0.0
    while True:
        started = time.perf_counter()
        try:
            piece = next(pieces)
        except StopIteration as end:
            yield dict(asdict(end.value), engine_s=engine_s + time.perf_counter() - started)
            return
        engine_s += time.perf_counter() - started
        yield {"piece": piece}

"""Replica pools and least-loaded routing (never random queue-group hot spots)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from protos.infer import ModelInfo, ReplicaInfo
from services.inference.catalog import Catalog, ModelSpec, resolve_source, threads_for
from shared.errors import DeadlineExceeded, NotFound, Unavailable

log = logging.getLogger("magi.inference.pool")


@dataclass
class Replica:
    replica_id: str
    actor: Any
    node: str = ""
    state: str = "starting"
    in_flight: int = 0
    served: int = 0
    tokens: int = 0
    busy_s: float = 0.0

    def info(self) -> ReplicaInfo:
        rate = self.tokens / self.busy_s if self.busy_s > 0 else 0.0
        return ReplicaInfo(
            replica=self.replica_id, node=self.node, state=self.state,
            in_flight=self.in_flight, served=self.served, tokens_per_s=round(rate, 2),
        )


@dataclass
class ModelPool:
    spec: ModelSpec
    threads: int
    source_path: str
    replicas: list[Replica] = field(default_factory=list)

    def pick(self) -> Replica:
        ready = [r for r in self.replicas if r.state == "ready"]
        if not ready:
            raise Unavailable(f"model {self.spec.name!r} has no ready replica", field="model")
        # Fewest requests in flight first; among equals the one that has served least.
        return min(ready, key=lambda r: (r.in_flight, r.served))

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.name, backend=self.spec.backend, roles=list(self.spec.roles),
            source=self.source_path, n_ctx=self.spec.n_ctx, threads=self.threads,
            replicas=[r.info() for r in self.replicas],
        )


class Router:
    """Owns every model's pool; resolves a request's model by name or role."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.pools: dict[str, ModelPool] = {}

    async def start(self, replica_cls) -> None:
        for spec in self.catalog.models:
            if spec.backend != "llama_cpp":
                raise NotFound(f"backend {spec.backend!r} of {spec.name} is not available on this node", field="backend")
            path = str(resolve_source(spec.source))
            pool = ModelPool(spec=spec, threads=threads_for(spec, self.catalog), source_path=path)
            for i in range(spec.replicas):
                rid = f"{spec.name}/{i}"
                actor = replica_cls.options(
                    # num_cpus=0: llama.cpp threads are sized by the catalogue, not by Ray's CPU accounting.
                    name=f"replica:{rid}", num_cpus=0, max_restarts=3
                ).remote(rid, path, spec.n_ctx, pool.threads, spec.embedding)
                pool.replicas.append(Replica(replica_id=rid, actor=actor))
            self.pools[spec.name] = pool
        await asyncio.gather(*(self._warm(r) for p in self.pools.values() for r in p.replicas))
        failed = [r.replica_id for p in self.pools.values() for r in p.replicas if r.state != "ready"]
        if failed:
            raise Unavailable(f"replicas failed to start: {', '.join(failed)}")

    async def _warm(self, replica: Replica) -> None:
        try:
            meta = await replica.actor.warmup.remote()
            replica.node, replica.state = meta["node"], "ready"
            log.info("replica ready", extra=meta)
        except Exception:
            replica.state = "failed"
            log.exception("replica failed to start", extra={"replica": replica.replica_id})

    def resolve(self, model: str, role: str | None, *, embedding: bool = False) -> ModelPool:
        if model:
            if model not in self.pools:
                raise NotFound(f"unknown model {model!r}; known: {', '.join(self.pools)}", field="model")
            pool = self.pools[model]
            if pool.spec.embedding != embedding:
                kind = "an embedding" if pool.spec.embedding else "a generation"
                raise NotFound(f"model {model!r} is {kind} model", field="model")
            return pool
        wanted = role or ("embed" if embedding else "heavy")
        for pool in self.pools.values():
            if wanted in pool.spec.roles:
                return pool
        raise NotFound(f"no model serves role {wanted!r}", field="role")

    async def call(self, pool: ModelPool, method: str, arg: Any, *, timeout: float) -> tuple[Replica, Any]:
        replica = pool.pick()
        replica.in_flight += 1
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        ref = getattr(replica.actor, method).remote(arg, request_id)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        except asyncio.TimeoutError:
            # The caller has given up: drop the call if still queued, stop it if running.
            import ray

            ray.cancel(ref)
            replica.actor.abort.remote(request_id)
            raise DeadlineExceeded(f"generation exceeded {timeout:.1f} s", field="timeout_s") from None
        finally:
            replica.in_flight -= 1
            replica.busy_s += time.perf_counter() - started
        replica.served += 1
        return replica, result

    def models(self) -> list[ModelInfo]:
        return [p.info() for p in self.pools.values()]

    def queue_stats(self) -> dict:
        return {name: {"in_flight": sum(r.in_flight for r in p.replicas), "ready": sum(r.state == "ready" for r in p.replicas)}
                for name, p in self.pools.items()}

    async def close(self) -> None:
        import ray

        for pool in self.pools.values():
            for replica in pool.replicas:
                ray.kill(replica.actor, no_restart=True)

"""The router: owns every model's replica pool, sends each request to a free replica, retries once
when a replica dies mid-request, and cancels by request id.

A streamed request that loses its replica continues on another one after the text already sent
(NVIDIA Dynamo's request migration), so the caller sees no piece twice and none missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from services.inference.catalog import Catalog, ModelSpec, threads_for
from services.inference.context import ContextWindow
from services.inference.follow import FOLLOW_INTERVAL_S, Follower, Where
from services.inference.keeper import Keeper, Make, actor_died
from services.inference.pool import ModelPool, Replica
from services.inference.weights import HeadWeights, local_head
from shared.errors import NotFound, Unavailable

log = logging.getLogger("magi.inference.router")

ATTEMPTS = 2  # the first replica, then one retry elsewhere
Emit = Callable[[str, Replica], Awaitable[None]]
Release = Callable[[ModelPool, list[Replica]], Awaitable[None]]  # frees removed replicas' placements


class CallerGone(Exception):
    """Raised by a stream's emit callback when nobody listens any more: generation stops."""


@dataclass
class _Job:
    replica: Replica | None = None  # None while the request waits for a free replica
    cancelled: bool = False


_CANCELLED = {"text": "", "prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "aborted"}


class Router:
    def __init__(self, catalog: Catalog, *, follow_interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self.catalog = catalog
        self.follow_interval_s = follow_interval_s
        self.pools: dict[str, ModelPool] = {}
        self.jobs: dict[str, _Job] = {}
        self.cancelled = 0
        self.keeper: Keeper | None = None
        self.release: Release | None = None
        self.weights: HeadWeights = local_head  # a model's file on this node and its digest (weights.py)
        self._follower: asyncio.Task | None = None

    async def start(self, make_actor: Make, *, where: Where | None = None, release: Release | None = None,
                    weights: HeadWeights | None = None) -> None:
        """Create every replica with `make_actor(pool, index)`, wait until each one has really generated,
        then check on them every `follow_interval_s` (alive? still placed there? see follow.py). `release`
        tells the scheduler a removed replica's placement is free again."""
        self.keeper = Keeper(make_actor)
        self.release = release
        self.weights = weights or self.weights
        for spec in self.catalog.models:
            pool = await self.open_pool(spec)
            pool.replicas = [await make_actor(pool, i) for i in range(spec.replicas)]
            self.pools[spec.name] = pool
        warmed = await asyncio.gather(*(self.keeper.warm(p, r) for p in self.pools.values() for r in p.replicas))
        replicas = [r for p in self.pools.values() for r in p.replicas]
        failed = [r for r, ok in zip(replicas, warmed) if not ok]
        for replica in failed:
            replica.state, replica.pid = "failed", 0
            self.keeper.retire(replica)
        if failed:
            raise Unavailable(f"replicas failed to start: {', '.join(r.replica_id for r in failed)}")
        # A live view: pools added or removed at run time are followed from the next round on.
        follower = Follower(self.pools.values(), self.keeper, where, interval_s=self.follow_interval_s)
        self._follower = asyncio.create_task(follower.run(), name="replica-follower")

    async def open_pool(self, spec: ModelSpec) -> ModelPool:
        """A model's pool without replicas yet: where its weights are, its threads and its context window."""
        head = await self.weights(spec)  # a store model is fetched onto this node first (its tokenizer)
        pool = ModelPool(spec=spec, threads=threads_for(spec, self.catalog), source_path=head.path,
                         digest=head.digest, download_bytes=head.size if head.store else 0)
        pool.window = await asyncio.to_thread(ContextWindow.open, spec, head.path)
        return pool

    # ---- changes at run time (reconcile.py drives them) ----------------------------------------------

    async def add_model(self, spec: ModelSpec) -> ModelPool:
        """A new model: its pool takes requests at once (they wait for a replica), its replicas start where
        the scheduler places them now."""
        pool = await self.open_pool(spec)
        fresh = [self._new_replica(pool) for _ in range(spec.replicas)]
        self.pools[spec.name] = pool
        await asyncio.gather(*(self._keeper.start(pool, r) for r in fresh))
        return pool

    async def reload(self, pool: ModelPool, spec: ModelSpec) -> None:
        """New settings that need fresh replicas: replicas started from now on are built from them (the
        caller replaces the older ones, reconcile.py)."""
        pool.take_settings(await self.open_pool(spec))  # spec, weights and digest, threads, window
        await pool.notify()

    def _new_replica(self, pool: ModelPool) -> Replica:
        replica = Replica(replica_id=f"{pool.spec.name}/{pool.next_index()}", actor=None, revision=pool.revision)
        pool.replicas.append(replica)  # listed (starting) at once, so its pool is not hopeless meanwhile
        return replica

    async def add_replica(self, pool: ModelPool) -> Replica:
        """One more replica, placed by the scheduler now (so a node that joined is used); returned once it
        is ready or has failed its first start (then the keeper tries again in the background)."""
        replica = self._new_replica(pool)
        await self._keeper.start(pool, replica)
        return replica

    async def remove_replica(self, pool: ModelPool, replica: Replica, *, drain_timeout_s: float) -> None:
        """Stop sending the replica work, let it finish what it serves (at most `drain_timeout_s`), then stop
        it and free its placement."""
        await self._stop_taking_work(pool, [replica])
        if not await pool.drained(replica, timeout_s=drain_timeout_s):
            log.warning("replica drain timed out; stopped with work in flight",
                        extra={"replica": replica.replica_id, "in_flight": replica.in_flight})
        if replica in pool.replicas:
            pool.replicas.remove(replica)
        await self._retire(pool, [replica])

    async def remove_model(self, name: str, *, drain_timeout_s: float) -> None:
        """New requests for the model get 404 at once; those already in (running or queued) finish, at most
        `drain_timeout_s`; then its replicas stop and their placements are freed."""
        pool = self.pools.pop(name, None)
        if pool is None:
            return
        if not await pool.drained(timeout_s=drain_timeout_s):
            log.warning("model drain timed out; its replicas stop with work in flight",
                        extra={"model": name, "queued": pool.queued})
        replicas = list(pool.replicas)
        await self._stop_taking_work(pool, replicas)  # anything still queued now fails fast (no live replica)
        await self._retire(pool, replicas)

    async def _stop_taking_work(self, pool: ModelPool, replicas: list[Replica]) -> None:
        for replica in replicas:
            await self._keeper.forget(replica)  # no restart or move of a replica on its way out
            replica.draining, replica.state = True, "draining"
        await pool.notify()

    async def _retire(self, pool: ModelPool, replicas: list[Replica]) -> None:
        for replica in replicas:
            self._keeper.retire(replica)
            log.info("replica removed", extra={"replica": replica.replica_id, "node": replica.node})
        placed = [r for r in replicas if r.placed]
        if self.release is not None and placed:
            try:
                await self.release(pool, placed)
            except Unavailable:  # no scheduler (the service alone): nothing was placed by one either
                log.info("no scheduler to release replica placements",
                         extra={"replicas": [r.replica_id for r in placed]})
            except Exception as exc:  # the scheduler forgets nothing then; the replicas are gone all the same
                log.warning("replica placements not released", extra={"replicas": [r.replica_id for r in placed],
                                                                      "error": f"{type(exc).__name__}: {exc}"})

    @property
    def _keeper(self) -> Keeper:
        if self.keeper is None:
            raise Unavailable("the inference service is still starting")
        return self.keeper

    def _lost(self, pool: ModelPool, replica: Replica) -> None:
        if self.keeper is not None:
            self.keeper.lost(pool, replica, replica.actor)

    async def check_fits(self, pool: ModelPool, messages: list[dict[str, str]], max_tokens: int) -> None:
        """400 for a request that cannot fit the model's context window, before any replica sees it."""
        if pool.window is not None and not pool.window.surely_fits(messages, max_tokens):
            await asyncio.to_thread(pool.window.check_generate, messages, max_tokens)

    async def check_embed_fits(self, pool: ModelPool, texts: list[str]) -> int:
        """The texts' tokens in all (0 where the pool has no tokenizer here); BadRequest when one is too long."""
        if pool.window is None:
            return 0
        counted = pool.window.check_embed_quickly(texts)
        return counted if counted is not None else await asyncio.to_thread(pool.window.check_embed, texts)

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

    async def generate(self, pool: ModelPool, params: dict, request_id: str) -> tuple[Replica, dict, int]:
        """One generation; the caller bounds it with a timeout (cancellation aborts the replica's work)."""
        with self._job(request_id) as job:
            return await self._generate(pool, params, request_id, job)

    @contextlib.contextmanager
    def _job(self, request_id: str):
        job = self.jobs[request_id] = _Job()
        try:
            yield job
        finally:
            self.jobs.pop(request_id, None)

    async def _generate(self, pool: ModelPool, params: dict, request_id: str, job: _Job) -> tuple[Replica, dict, int]:
        for attempt in range(1, ATTEMPTS + 1):
            replica = await pool.acquire(admitted=attempt > 1)  # a retry is never refused for load
            if job.cancelled:
                await pool.release(replica, 0.0)
                return replica, dict(_CANCELLED), attempt
            try:
                out = await self._on(pool, replica, request_id, replica.actor.generate.remote(params, request_id))
            except Exception as exc:
                if not actor_died(exc) or attempt == ATTEMPTS:
                    raise
                pool.counters["retried"] += 1
                continue
            replica.tokens += out["completion_tokens"]
            return replica, out, attempt
        raise AssertionError("unreachable")

    async def _on(self, pool: ModelPool, replica: Replica, request_id: str, call: Awaitable[Any]) -> Any:
        """Await one actor call on a reserved replica: track it for cancel, release it however it ends."""
        job = self.jobs.get(request_id)
        if job is not None:
            job.replica = replica
        started = time.perf_counter()
        try:
            result = await call
            replica.served += 1
            return result
        except asyncio.CancelledError:
            replica.actor.abort.remote(request_id)  # the caller gave up (deadline): stop at the next token
            raise
        except Exception as exc:
            if actor_died(exc):
                self._lost(pool, replica)
            raise
        finally:
            if job is not None:
                job.replica = None
            await pool.release(replica, time.perf_counter() - started)

    async def stream(self, pool: ModelPool, params: dict, request_id: str, emit: Emit) -> tuple[Replica, dict, int]:
        """Stream pieces through `emit`; on replica death continue elsewhere after what was already sent."""
        with self._job(request_id) as job:
            return await self._stream(pool, params, request_id, emit, job)

    async def _stream(self, pool: ModelPool, params: dict, request_id: str, emit: Emit,
                      job: _Job) -> tuple[Replica, dict, int]:
        sent: list[str] = []
        for attempt in range(1, ATTEMPTS + 1):
            replica = await pool.acquire(admitted=attempt > 1)  # a retry is never refused for load
            if job.cancelled:
                await pool.release(replica, 0.0)
                return replica, dict(_CANCELLED, text="".join(sent), completion_tokens=len(sent)), attempt
            left = dict(params, max_tokens=params["max_tokens"] - len(sent))
            try:
                final = await self._on(pool, replica, request_id, self._pump(replica, left, request_id, sent, emit))
            except Exception as exc:
                if not actor_died(exc) or attempt == ATTEMPTS or len(sent) >= params["max_tokens"]:
                    raise
                log.warning("stream migrated", extra={"request_id": request_id, "after_pieces": len(sent)})
                pool.counters["migrated"] += 1
                continue
            if final.get("finish_reason") == "caller_gone":
                pool.counters["abandoned"] += 1
            final["text"] = "".join(sent)
            if attempt > 1 or "completion_tokens" not in final:
                # Continued after a replica died: the pieces sent by both (one per token on the plain engine;
                # the dead replica's own count is lost with it).
                final["completion_tokens"] = len(sent)
            # else the engine's count: a batched engine may send several tokens as one piece (a UTF-8
            # character, text held back while it might start a stop string).
            replica.tokens += final["completion_tokens"]
            return replica, final, attempt
        raise AssertionError("unreachable")

    async def _pump(self, replica: Replica, params: dict, request_id: str, sent: list[str], emit: Emit) -> dict:
        final: dict = {}
        pieces = replica.actor.stream.remote(params, request_id, "".join(sent))
        try:
            async for ref in pieces:
                item = await ref
                if "piece" in item:
                    sent.append(item["piece"])
                    await emit(item["piece"], replica)
                else:
                    final = item
        except CallerGone:
            replica.actor.abort.remote(request_id)
            final = {"finish_reason": "caller_gone", "prompt_tokens": 0}
        return final

    def cancel(self, request_id: str) -> bool:
        job = self.jobs.get(request_id)
        if job is None or job.cancelled:
            return False
        job.cancelled = True
        self.cancelled += 1
        if job.replica is not None:
            job.replica.actor.abort.remote(request_id)
        return True

    async def embed(self, pool: ModelPool, texts: list[str], request_id: str) -> tuple[Replica, dict | list[list[float]]]:
        replica = await pool.acquire()
        return replica, await self._on(pool, replica, request_id, replica.actor.embed.remote(texts, request_id))

    def models(self):
        return [p.info() for p in self.pools.values()]

    def queue_stats(self) -> dict:
        """The service's figures in `$SRV.STATS` (the gateway's `/metrics` reads them): each model's queue and
        counters (with the requests refused for a full queue), and each replica's load and the tokens it generated."""
        models = {name: {**p.stats(), "refused": p.refused} for name, p in self.pools.items()}
        return {"models": models, "cancelled": self.cancelled,
                "replicas": [p.replica_stats(r) for p in self.pools.values() for r in p.replicas]}

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self.keeper is not None:
            await self.keeper.close()
            for pool in self.pools.values():
                for replica in pool.replicas:
                    self.keeper.retire(replica)

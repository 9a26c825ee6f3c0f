"""Creating replica actors (and their llama.cpp RPC shards) where the scheduler placed them.

Every MAGI node in the Ray cluster carries a custom resource `magi_node:<name>` (the local Ray gets
the local node's; a node's agent passes `--resources` to `ray start`). An actor asks for a sliver of
its node's resource, so Ray runs it exactly there. Nodes come from `magi.sched.place`: a plain replica
is one instance; a sharded replica is a gang (its shards and its coordinator, all or none) whose
coordinator goes to the node with the best seed-001 score. A vLLM replica with tensor_parallel_size N is a gang
of N GPU workers; spread over nodes, it runs in a Ray placement group (tp_groups.py). With no scheduler
answering (the inference service alone, as in benchmarks) everything stays on the local node.

A model from the bus's model store (`store:NAME`) is fetched onto the replica's node by that node's agent,
verified by the digest the head loaded, before the actor is created with the node's own path (weights.py);
the replica is reported ready only after it has then generated (keeper.py). The scheduler is told the model's
digest and download size, so it prefers a node that holds it and refuses one without room for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path

from nats.aio.client import Client

from protos.sched import InstanceSpec, PlaceReply, PlaceRequest
from services.inference import tp_groups
from services.inference.pool import ModelPool, Replica
from services.inference.weights import ModelFiles
from shared import bus
from shared.config import Settings
from shared.errors import MagiError, Unavailable

log = logging.getLogger("magi.inference.replicas")

NODE_RESOURCE = "magi_node:{}"
PLACE_TIMEOUT_S = 15.0
RAY_JOIN_WAIT_S = 120.0


def node_resource(node: str) -> str:
    return NODE_RESOURCE.format(node)


def instance_id(replica_id: str) -> str:
    return "replica-" + re.sub(r"[^A-Za-z0-9_-]", "-", replica_id)


def model_gb(model_path: str) -> float:
    path = Path(model_path)
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]  # a vLLM model folder
    return sum(f.stat().st_size for f in files) / 2**30


def replica_ram_gb(model_path: str, n_ctx: int) -> float:
    # Weights are mapped whole; the KV cache and scratch buffers add roughly 0.1 MB per context token.
    return round(model_gb(model_path) * 1.2 + n_ctx * 1e-4, 3)


def gang_specs(pool: ModelPool, replica_id: str) -> list[InstanceSpec]:
    """A sharded replica: its coordinator (seed-001 placement by model size) plus one instance per shard."""
    base, n = instance_id(replica_id), pool.spec.shards
    size = model_gb(pool.source_path)
    coordinator = InstanceSpec(instance_id=base, ram_gb=round(pool.spec.n_ctx * 1e-4 + 0.05, 3),
                               model_size_gb=round(size, 3), group=base, **model_fields(pool))
    shards = [InstanceSpec(instance_id=f"{base}-shard{k}", ram_gb=round(size / n * 1.2, 3), group=base)
              for k in range(n)]
    return [coordinator, *shards]


def live_ray_nodes() -> set[str]:
    """MAGI nodes whose Ray node is alive (a node that died stays in `ray.nodes()` with Alive false)."""
    import ray

    prefix = node_resource("")
    return {key[len(prefix):] for node in ray.nodes() if node.get("Alive")
            for key in node.get("Resources", {}) if key.startswith(prefix)}


def replica_specs(pool: ModelPool, replica_id: str) -> list[InstanceSpec]:
    """What the scheduler places for one replica: the replica itself, then its shards (if sharded)."""
    if pool.spec.shards:
        return gang_specs(pool, replica_id)
    cells = pool.spec.n_ctx * pool.spec.max_batch  # a batched replica's KV cache holds every slot's window
    if tp_groups.is_tp_gang(pool.spec.backend, pool.spec.tensor_parallel_size):  # one instance per GPU worker
        return tp_groups.worker_specs(instance_id(replica_id), pool.spec.tensor_parallel_size,
                                      ram_gb=replica_ram_gb(pool.source_path, cells),
                                      model_gb=model_gb(pool.source_path), extra=model_fields(pool))
    return [InstanceSpec(instance_id=instance_id(replica_id), ram_gb=replica_ram_gb(pool.source_path, cells),
                         gpu_required=pool.spec.gpus > 0,  # vLLM, or llama.cpp with n_gpu_layers
                         gpus=pool.spec.gpus,  # held for the replica's life: a node takes no more than it has
                         **model_fields(pool))]


def model_fields(pool: ModelPool) -> dict:
    """A store model's digest and download size for the scheduler (a local source downloads nothing)."""
    if not pool.download_bytes:
        return {}
    return dict(model_digest=pool.digest, download_gb=round(pool.download_bytes / 2**30, 6))


def actor_options(pool: ModelPool, name: str, node: str) -> dict:
    """Ray's options for a replica actor: on its node, with the GPUs it offloads to."""
    return dict(
        name=name,
        num_cpus=0,  # llama.cpp threads are sized by the catalogue, not by Ray's CPU accounting
        num_gpus=pool.spec.gpus,  # Ray then shows the replica only its own GPUs (CUDA_VISIBLE_DEVICES)
        resources={node_resource(node): 0.001},
        # The service restarts replicas itself (keeper.py): Ray would restart one only on its pinned
        # node, and never elsewhere when that node is gone.
        max_restarts=0,
        max_concurrency=pool.spec.actor_concurrency,  # a batched replica serves max_batch at once
    )


def replica_kwargs(pool: ModelPool, endpoints: list[str]) -> dict:
    """The replica actor's keyword arguments. GPU offload is passed only when the catalogue asks for it, so a
    CPU replica's actor is built exactly as before."""
    spec = pool.spec
    kwargs = dict(backend=spec.backend, rpc_servers=endpoints or None, max_batch=spec.max_batch,
                  kv_unified=spec.kv_unified)
    if spec.n_gpu_layers:
        kwargs.update(n_gpu_layers=spec.n_gpu_layers, main_gpu=spec.main_gpu, tensor_split=list(spec.tensor_split))
    if spec.backend == "vllm":
        kwargs["tensor_parallel_size"] = spec.tensor_parallel_size
    return kwargs


def replica_class(backend: str):
    """The actor class for a backend: llama.cpp's threaded one, or vLLM's async one (one AsyncLLM per replica)."""
    if backend == "vllm":
        from services.inference.vllm_replica import VllmReplica

        return VllmReplica
    from services.inference.replica import LlamaReplica

    return LlamaReplica


def node_gpus(ray_nodes: list[dict], node: str) -> float:
    """GPUs Ray counts on a MAGI node (the most any of its live Ray nodes has), from `ray.nodes()`."""
    key = node_resource(node)
    return max((n.get("Resources", {}).get("GPU", 0.0) for n in ray_nodes
                if n.get("Alive") and key in n.get("Resources", {})), default=0.0)


def check_gpus(pool: ModelPool, node: str) -> None:
    """A replica that needs GPUs on a node whose Ray has too few would wait in Ray until its warm-up timed out;
    refuse it now, saying why (a node without GPUs, or one whose Ray was started without them)."""
    import ray

    if node_gpus(ray.nodes(), node) < pool.spec.gpus:
        field = "backend" if pool.spec.backend == "vllm" else "n_gpu_layers"
        raise Unavailable(f"model {pool.spec.name} needs {pool.spec.gpus} GPU(s) (n_gpu_layers / tensor_split, or "
                          f"the vllm backend) but Ray counts fewer on node {node}", field=field)


def check_tp_gpus(pool: ModelPool, nodes: list[str]) -> None:
    """A tensor-parallel replica spread over nodes: each node needs a GPU per worker placed there."""
    import ray

    ray_nodes = ray.nodes()
    tp_groups.check_fit(pool.spec.name, nodes, lambda node: node_gpus(ray_nodes, node))


def pins(pool: ModelPool, specs: list[InstanceSpec]) -> dict[str, str]:
    """The catalogue's pins (`node`, `shard_nodes`) as explicit placements; `node` pins every GPU worker of a
    tensor-parallel replica."""
    if pool.spec.node and tp_groups.is_tp_gang(pool.spec.backend, pool.spec.tensor_parallel_size):
        return {spec.instance_id: pool.spec.node for spec in specs}
    explicit = {specs[0].instance_id: pool.spec.node} if pool.spec.node else {}
    explicit.update({spec.instance_id: node for spec, node in zip(specs[1:], pool.spec.shard_nodes)})
    return explicit


class ReplicaFactory:
    def __init__(self, settings: Settings, nc: Client | None) -> None:
        self.settings = settings
        self.nc = nc
        self._generation: dict[str, int] = {}  # a restarted replica's actor needs a name of its own
        self._scheduler_down = False  # one log line per scheduler outage, not one per question
        self.files = ModelFiles(settings, nc)
        self.head_weights = self.files.head  # the router's `weights`: each model's file on this node

    async def model_path(self, pool: ModelPool, node: str) -> str:
        """The file the replica on `node` loads: a store model fetched there first, exactly the pool's digest."""
        if not pool.spec.store_name:
            return pool.source_path
        return (await self.files.on_node(pool.spec, node, pool.digest)).path

    async def __call__(self, pool: ModelPool, index: int) -> Replica:
        replica_id = f"{pool.spec.name}/{index}"
        nodes = await self._place_on_live_nodes(pool, replica_id, replica_specs(pool, replica_id))
        across = tp_groups.needs_group(pool.spec.backend, pool.spec.tensor_parallel_size, nodes)
        if across:
            await asyncio.to_thread(check_tp_gpus, pool, nodes)
        elif pool.spec.gpus:
            await asyncio.to_thread(check_gpus, pool, nodes[0])
        path = await self.model_path(pool, nodes[0])
        shard_actors, endpoints = await self._start_shards(pool, nodes[1:] if pool.spec.shards else [])
        generation = self._generation[replica_id] = self._generation.get(replica_id, -1) + 1
        name = f"replica:{replica_id}" + (f"#{generation}" if generation else "")
        options, kwargs = actor_options(pool, name, nodes[0]), replica_kwargs(pool, endpoints)
        group = None
        if across:
            group = await tp_groups.reserve(nodes, f"tp:{name}")
            options, kwargs["ray_executor"] = tp_groups.in_group(options, group), True
        actor = replica_class(pool.spec.backend).options(**options).remote(
            replica_id, path, pool.spec.n_ctx, pool.threads, pool.spec.embedding, **kwargs)
        if group is not None:
            tp_groups.remember(actor, group)  # removed with the actor when the keeper retires it
        return Replica(replica_id=replica_id, actor=actor, node=nodes[0], shards=endpoints, shard_actors=shard_actors,
                       placed=nodes, digest=pool.digest)

    async def _start_shards(self, pool: ModelPool, nodes: list[str]) -> tuple[list, list[str]]:
        if not nodes:
            return [], []
        from services.inference.shard import RpcShard

        threads = pool.spec.shard_threads or max(1, (os.cpu_count() or 1) // len(nodes))
        actors = [RpcShard.options(resources={node_resource(node): 0.001}).remote(
            host="", threads=threads, allow_any_address=pool.spec.rpc_allow_any_address) for node in nodes]
        endpoints = await asyncio.gather(*(a.endpoint.remote() for a in actors))
        log.info("rpc shards ready", extra={"model": pool.spec.name, "endpoints": endpoints})
        return actors, list(endpoints)

    async def _place_on_live_nodes(self, pool: ModelPool, replica_id: str, specs: list[InstanceSpec]) -> list[str]:
        """Where the scheduler places the replica, once those nodes are alive in Ray. The scheduler is asked
        again while waiting: nodes join Ray a moment after their agent starts, and a node that died is
        evacuated by the scheduler after a few missed heartbeats, so its answer changes."""
        deadline = time.monotonic() + RAY_JOIN_WAIT_S
        while True:
            nodes = await self._place(pool, replica_id, specs)
            missing = sorted(set(nodes) - await asyncio.to_thread(live_ray_nodes))
            if not missing:
                return nodes
            if time.monotonic() > deadline:
                raise Unavailable(f"node(s) {', '.join(missing)} not alive in the Ray cluster (a node's agent runs "
                                  f"`ray start` with MAGI_RAY_JOIN; resource {node_resource(missing[0])})", field="node")
            await asyncio.sleep(1.0)

    async def placements(self, replicas: list[tuple[ModelPool, Replica]]) -> dict[str, list[str]] | None:
        """Where the scheduler places each replica now (its node, then its shards'), in one question;
        None without a scheduler. Placing ids already placed moves nothing: it answers their node."""
        if self.nc is None:
            return None
        wanted = {r.replica_id: (pool, replica_specs(pool, r.replica_id)) for pool, r in replicas}
        request = PlaceRequest(instances=[s for _, specs in wanted.values() for s in specs],
                               placement={k: v for pool, specs in wanted.values() for k, v in pins(pool, specs).items()})
        try:
            reply = await bus.request(self.nc, "magi.sched.place", request, PlaceReply, timeout=PLACE_TIMEOUT_S)
        except MagiError as exc:
            self._scheduler_outage(exc)
            return None
        self._scheduler_outage(None)
        return {rid: [reply.placements.get(s.instance_id, "") for s in specs] for rid, (_, specs) in wanted.items()}

    def _scheduler_outage(self, exc: MagiError | None) -> None:
        if exc is not None and not self._scheduler_down:
            log.warning("scheduler not answering; replicas stay where they are", extra={"error": exc.message})
        elif exc is None and self._scheduler_down:
            log.info("scheduler answering again")
        self._scheduler_down = exc is not None

    async def _place(self, pool: ModelPool, replica_id: str, specs: list[InstanceSpec]) -> list[str]:
        """One node per spec, in order: the catalogue's pins (`node`, `shard_nodes`) as explicit placements,
        the scheduler's choice for the rest; the pins or the local node without a scheduler."""
        explicit = pins(pool, specs)
        fixed = [explicit.get(s.instance_id) or pool.spec.node or self.settings.node() for s in specs]
        if self.nc is None:
            return fixed
        deadline = time.monotonic() + PLACE_TIMEOUT_S
        while True:
            try:
                reply = await bus.request(self.nc, "magi.sched.place", PlaceRequest(instances=specs, placement=explicit),
                                          PlaceReply, timeout=PLACE_TIMEOUT_S)
            except MagiError as exc:
                log.warning("no scheduler placement; replica stays local",
                            extra={"replica": replica_id, "nodes": fixed, "error": exc.message})
                return fixed
            nodes = [reply.placements.get(s.instance_id, "") for s in specs]
            if all(nodes):
                return nodes
            if time.monotonic() > deadline:
                reasons = "; ".join(f"{k}: {v}" for k, v in reply.unplaced.items())
                raise Unavailable(f"scheduler could not place {replica_id}: {reasons}")
            # A scheduler that just started may not have heard any node's heartbeat yet.
            await asyncio.sleep(0.5)

"""Creating replica actors where the scheduler placed them.

Every MAGI node in the Ray cluster carries a custom resource `magi_node:<name>` (the local Ray gets
the local node's; a node's agent passes `--resources` to `ray start`). A replica asks for a sliver of
its node's resource, so Ray runs it exactly there. The node comes from `magi.sched.place`; when no
scheduler answers (the inference service alone, as in benchmarks) replicas stay on the local node.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

from nats.aio.client import Client

from protos.sched import InstanceSpec, PlaceReply, PlaceRequest
from services.inference.pool import ModelPool, Replica
from shared import bus
from shared.config import Settings
from shared.errors import MagiError, Unavailable

log = logging.getLogger("magi.inference.replicas")

NODE_RESOURCE = "magi_node:{}"
PLACE_TIMEOUT_S = 15.0


def node_resource(node: str) -> str:
    return NODE_RESOURCE.format(node)


def instance_id(replica_id: str) -> str:
    return "replica-" + re.sub(r"[^A-Za-z0-9_-]", "-", replica_id)


def replica_ram_gb(model_path: str, n_ctx: int) -> float:
    # Weights are mapped whole; the KV cache and scratch buffers add roughly 0.1 MB per context token.
    return round(Path(model_path).stat().st_size / 2**30 * 1.2 + n_ctx * 1e-4, 3)


def _require_ray_node(node: str) -> None:
    import ray

    if node_resource(node) not in ray.cluster_resources():
        raise Unavailable(f"node {node!r} has not joined the Ray cluster (ray start --resources "
                          f"'{{\"{node_resource(node)}\": 1000}}')", field="node")


class ReplicaFactory:
    def __init__(self, settings: Settings, nc: Client | None, *, max_restarts: int = 5) -> None:
        self.settings = settings
        self.nc = nc
        self.max_restarts = max_restarts

    async def __call__(self, pool: ModelPool, index: int) -> Replica:
        replica_id = f"{pool.spec.name}/{index}"
        node = await self._place(pool, replica_id)
        _require_ray_node(node)
        actor = self._actor_class(pool).options(
            name=f"replica:{replica_id}",
            num_cpus=0,  # llama.cpp threads are sized by the catalogue, not by Ray's CPU accounting
            num_gpus=1 if pool.spec.backend == "vllm" else 0,
            resources={node_resource(node): 0.001},
            max_restarts=self.max_restarts,
        ).remote(replica_id, pool.source_path, pool.spec.n_ctx, pool.threads, pool.spec.embedding,
                 backend=pool.spec.backend)
        return Replica(replica_id=replica_id, actor=actor, node=node)

    @staticmethod
    def _actor_class(pool: ModelPool):
        from services.inference.replica import LlamaReplica

        return LlamaReplica

    async def _place(self, pool: ModelPool, replica_id: str) -> str:
        local = self.settings.node()
        if pool.spec.node:
            return pool.spec.node
        if self.nc is None:
            return local
        spec = InstanceSpec(instance_id=instance_id(replica_id), ram_gb=replica_ram_gb(pool.source_path, pool.spec.n_ctx),
                            gpu_required=pool.spec.backend == "vllm")
        deadline = time.monotonic() + PLACE_TIMEOUT_S
        while True:
            try:
                reply = await bus.request(self.nc, "magi.sched.place", PlaceRequest(instances=[spec]), PlaceReply,
                                          timeout=PLACE_TIMEOUT_S)
            except MagiError as exc:
                log.warning("no scheduler placement; replica stays local",
                            extra={"replica": replica_id, "node": local, "error": exc.message})
                return local
            node = reply.placements.get(spec.instance_id)
            if node:
                return node
            if time.monotonic() > deadline:
                raise Unavailable(f"scheduler could not place {replica_id}: {reply.unplaced.get(spec.instance_id)}")
            # A scheduler that just started may not have heard any node's heartbeat yet.
            await asyncio.sleep(0.5)

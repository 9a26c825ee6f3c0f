"""Tensor parallelism across nodes: a vLLM replica whose GPU workers the scheduler spread over several nodes
runs with vLLM's Ray executor inside a Ray placement group of one bundle per worker.

The scheduler places a replica with `tensor_parallel_size` N as a gang of N GPU workers (`worker_specs`): all
of them, or none. Where it puts them all on one node, the replica keeps the single-node path (the actor takes
N GPUs, vLLM's own `mp` worker processes). Where they span nodes, the replica gets a placement group with one
bundle `{"GPU": 1, "magi_node:<node>": 0.001}` per worker, so each bundle lands on the node the scheduler
chose, and the replica's actor is scheduled into bundle 0 (the first worker's node) with
`placement_group_capture_child_tasks=True` and no GPU of its own.

How vLLM uses the group, as read in vllm-project/vllm (v0.11 to main):
- `vllm/v1/executor/ray_utils.py` `initialize_ray_cluster`: the group in `parallel_config.placement_group`
  wins, else `ray.util.get_current_placement_group()`; every bundle may hold at most one GPU, and there must be
  as many GPU bundles as the world size; `_verify_bundles` refuses a group without a bundle on the driver's
  node (hence the actor in bundle 0).
- `vllm/v1/executor/ray_executor.py` `_init_workers_ray`: one `RayWorkerWrapper` per GPU bundle (the first
  world-size bundles holding a GPU, or `VLLM_RAY_BUNDLE_INDICES`), each `num_gpus=VLLM_RAY_PER_WORKER_GPUS`
  (1) and `num_cpus=0`, scheduled by `PlacementGroupSchedulingStrategy` onto its bundle.
- `examples/offline_inference/rlhf_colocate.py`: the engine's own actor takes `num_gpus=0` inside the group
  with `placement_group_capture_child_tasks=True` and `distributed_executor_backend="ray"`.
`AsyncLLM` runs its engine core in a child process, a fresh Ray driver that is not in the group, so the
replica passes the group explicitly in `parallel_config.placement_group` (vllm_async.build) and points the
child at this Ray cluster (`driver_env`).

The group lives as long as the replica's actor: `remember` ties it to the actor and `release` (called where
the keeper retires a replica's actors) removes it, which also ends the vLLM workers inside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any, Callable

from protos.sched import InstanceSpec
from shared.errors import Unavailable

log = logging.getLogger("magi.inference.tp")

NODE_RESOURCE = "magi_node:{}"  # as replicas.py: every MAGI node's Ray carries it
NODE_SLIVER = 0.001
READY_TIMEOUT_S = 120.0  # GPUs freed by a replica being replaced can take a while to come back to Ray
WORKER_GPU_MEMORY_FACTOR = 1.2  # a worker's share of the weights, plus CUDA context and activations

# id(replica actor handle) -> (that handle, its placement group); by identity, so any actor object will do
_groups: dict[int, tuple[Any, Any]] = {}


# ---- pure decisions --------------------------------------------------------------------------------------

def is_tp_gang(backend: str, tensor_parallel_size: int) -> bool:
    """A replica the scheduler places as one instance per GPU worker."""
    return backend == "vllm" and tensor_parallel_size > 1


def worker_specs(base: str, tensor_parallel_size: int, *, ram_gb: float, model_gb: float,
                 extra: dict | None = None) -> list[InstanceSpec]:
    """One spec per GPU worker, all in gang `base`: worker 0 is the replica itself (its RAM and model fields),
    the rest ask for a GPU and their share of the weights in GPU memory, and prefer worker 0's node, so the
    scheduler keeps the workers on one node unless one node cannot hold them. Each worker is a process, so it
    counts toward its node's `max_instances` (4 unless the agent's label says more: raise it on GPU nodes that
    should hold more workers)."""
    share = round(model_gb / tensor_parallel_size * WORKER_GPU_MEMORY_FACTOR, 3)
    first = InstanceSpec(instance_id=base, ram_gb=ram_gb, gpu_required=True, gpu_memory_gb=share, gpus=1, group=base,
                         **(extra or {}))
    rest = [InstanceSpec(instance_id=f"{base}-gpu{k}", ram_gb=0.05, gpu_required=True, gpu_memory_gb=share, gpus=1,
                         group=base, affinity=[base]) for k in range(1, tensor_parallel_size)]
    return [first, *rest]


def workers_per_node(nodes: list[str]) -> dict[str, int]:
    """How many GPU workers each node holds, in the order the nodes first appear (the replica's node first)."""
    return dict(Counter(nodes))


def spans_nodes(nodes: list[str]) -> bool:
    """True when the workers are on more than one node: vLLM's Ray executor in a placement group."""
    return len(set(nodes)) > 1


def needs_group(backend: str, tensor_parallel_size: int, nodes: list[str]) -> bool:
    """A tensor-parallel vLLM replica whose workers were placed on several nodes (one node: the `mp` path)."""
    return is_tp_gang(backend, tensor_parallel_size) and spans_nodes(nodes)


def bundles(nodes: list[str], device: str = "GPU") -> list[dict[str, float]]:
    """The placement group's bundles, one per worker and in the workers' order: one device each (vLLM refuses
    a bundle with more), pinned to its node by a sliver of the node's resource."""
    return [{device: 1.0, NODE_RESOURCE.format(node): NODE_SLIVER} for node in nodes]


def check_fit(model: str, nodes: list[str], gpus_on: Callable[[str], float]) -> None:
    """Refuse at once a placement that puts more workers on a node than Ray counts GPUs there (the scheduler
    counts GPU memory, not GPUs): the group would wait for GPUs that never come."""
    for node, workers in workers_per_node(nodes).items():
        have = gpus_on(node)
        if have < workers:
            raise Unavailable(f"model {model}: {workers} tensor-parallel worker(s) placed on node {node}, where Ray "
                              f"counts {have:g} GPU(s)", field="tensor_parallel_size")


# ---- Ray ---------------------------------------------------------------------------------------------------

async def reserve(nodes: list[str], name: str, *, timeout_s: float = READY_TIMEOUT_S, device: str = "GPU"):
    """A ready placement group with one bundle per worker on `nodes`; Unavailable (and nothing left behind)
    when Ray cannot provide it within `timeout_s`."""
    from ray.util import placement_group, remove_placement_group

    # Each bundle names its node, so the strategy only matters between bundles of one node: PACK keeps them
    # together, as the scheduler meant.
    group = placement_group(bundles(nodes, device), strategy="PACK", name=name)
    try:
        await asyncio.wait_for(group.ready(), timeout_s)
    except BaseException as exc:
        remove_placement_group(group)
        if isinstance(exc, TimeoutError):
            raise Unavailable(f"Ray could not reserve {len(nodes)} GPU(s) on node(s) "
                              f"{', '.join(workers_per_node(nodes))} within {timeout_s:g} s "
                              f"(placement group {name})", field="tensor_parallel_size") from None
        raise
    log.info("tensor-parallel group ready", extra={"group": name, "workers": workers_per_node(nodes)})
    return group


def in_group(options: dict, group) -> dict:
    """A replica actor's Ray options moved into `group`'s bundle 0: no GPU and no node resource of its own (the
    bundle pins the node), its child tasks (vLLM's workers) kept in the group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    moved = {k: v for k, v in options.items() if k != "resources"}
    moved.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
    return moved


def remember(actor: Any, group) -> None:
    _groups[id(actor)] = (actor, group)


def group_of(actor: Any):
    held = _groups.get(id(actor))
    return held[1] if held is not None and held[0] is actor else None


def release(actor: Any) -> bool:
    """Remove the placement group of a retired replica actor; False when it had none."""
    group = group_of(actor)
    if group is None:
        return False
    del _groups[id(actor)]
    from ray.util import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception as exc:  # Ray already gone (service shutting down): the group went with it
        log.warning("placement group not removed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
    return True


def driver_env() -> dict[str, str]:
    """Environment for the engine core's child process: it joins this Ray cluster (its `ray.init()` in
    `initialize_ray_cluster` reads RAY_ADDRESS) instead of starting a Ray of its own."""
    import ray

    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def prepare_driver() -> Any:
    """In the replica actor: the placement group it runs in, with the environment set for vLLM's engine core.
    CUDA_VISIBLE_DEVICES, which Ray may empty for an actor without GPUs, is dropped so the engine still sees the
    node's GPUs as a CUDA platform (vLLM's rlhf_colocate example does the same); the workers get theirs from Ray."""
    import ray

    group = ray.util.get_current_placement_group()
    if group is None:
        raise Unavailable("the replica was to run vLLM's Ray executor but is in no placement group",
                          field="tensor_parallel_size")
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    for key, value in driver_env().items():
        os.environ.setdefault(key, value)
    return group

"""Tensor parallelism on one node with two GPUs: TP=1 vs TP=2 (vLLM's `mp` workers), and TP=2 the way a replica
whose workers span nodes runs (tp_groups.py): the replica actor in a Ray placement group of one GPU bundle per
worker, vLLM's Ray executor, the group removed when the keeper retires it. Two nodes cannot be had on one
machine; the Ray path is the same, with both bundles on this node.

The model is MAGI_VLLM_MODEL or the tiny random Llama (benchmarks/tiny_llama.py): nothing is downloaded."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest

from benchmarks.tiny_llama import build_tiny_llama, prompt_words
from services.inference.engine import GenerateParams
from tests.gpu.devices import vllm_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]




if vllm_gpus() < 2:
    pytest.skip("needs vLLM (the `gpu` extra) and two CUDA GPUs on this node", allow_module_level=True)

PROMPTS = 16
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return os.environ.get("MAGI_VLLM_MODEL") or str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def _params(i: int) -> GenerateParams:
    return GenerateParams(messages=[{"role": "user", "content": prompt_words(i)}], max_tokens=MAX_TOKENS,
                          temperature=0.0, seed=0)


def _serve(model: str, tensor_parallel_size: int) -> tuple[list[str], float]:
    """Answers to PROMPTS requests sent at once, and the aggregate tokens/s (after an untimed warm-up)."""
    from services.inference import vllm_async

    engine = vllm_async.build(model, n_ctx=1024, embedding=False, max_batch=PROMPTS, gpu_memory_utilization=0.3,
                              tensor_parallel_size=tensor_parallel_size, enforce_eager=True)

    async def run():  # one event loop for the engine's whole life (AsyncLLM binds its output task to it)
        try:
            await engine.generate(_params(0), "warm")
            started = time.perf_counter()
            outs = await asyncio.gather(*(engine.generate(_params(i), f"tp{i}") for i in range(PROMPTS)))
            return [o.text for o in outs], sum(o.completion_tokens for o in outs) / (time.perf_counter() - started)
        finally:
            await engine.close()

    return asyncio.run(run())


def test_two_way_tensor_parallelism_answers_as_one_gpu_does(model, record_property):
    one, one_rate = _serve(model, 1)
    two, two_rate = _serve(model, 2)
    record_property("vllm.tp1.tokens_per_s", round(one_rate, 1))
    record_property("vllm.tp2.tokens_per_s", round(two_rate, 1))
    assert all(two)
    # The same weights split over two GPUs: greedy answers start alike (fp16 sums in another order may flip
    # a later near-tie, so only the first words are compared).
    same_start = sum(a.split()[:4] == b.split()[:4] for a, b in zip(one, two))
    assert same_start >= PROMPTS * 3 // 4, (one, two)


def test_a_replica_in_a_placement_group_runs_vllms_ray_executor_and_gives_the_gpus_back(model):
    import services.inference.ray_runtime  # noqa: F401, I001  (Ray on loopback; before Ray is imported)
    import ray
    from services.inference import tp_groups
    from services.inference.keeper import Keeper
    from services.inference.pool import Replica
    from services.inference.vllm_replica import VllmReplica

    ray.init(resources={"magi_node:here": 1000}, include_dashboard=False, log_to_driver=False)
    try:
        gpus = ray.cluster_resources()["GPU"]
        group = asyncio.run(tp_groups.reserve(["here", "here"], "tp:gpu-test", timeout_s=60))
        options = tp_groups.in_group({"name": "replica:tp/0", "num_cpus": 0, "num_gpus": 2, "max_restarts": 0,
                                      "max_concurrency": 8, "resources": {"magi_node:here": 0.001}}, group)
        actor = VllmReplica.options(**options).remote("tp/0", model, 1024, 1, False, max_batch=4,
                                                      tensor_parallel_size=2, ray_executor=True)
        tp_groups.remember(actor, group)
        assert ray.get(actor.warmup.remote(), timeout=600)["replica"] == "tp/0"
        out = ray.get(actor.generate.remote(dataclasses.asdict(_params(1)), "tp-ray-1"), timeout=120)
        assert out["completion_tokens"] > 0 and out["finish_reason"] in ("stop", "length")
        Keeper(make=None).retire(Replica(replica_id="tp/0", actor=actor))
        assert ray.util.placement_group_table(group)["state"] == "REMOVED"
        deadline = time.monotonic() + 60
        while ray.available_resources().get("GPU", 0) < gpus and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("GPU", 0) == gpus  # the workers went with the group
    finally:
        ray.shutdown()

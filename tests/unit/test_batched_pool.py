"""A batched model's replicas are free while they have a free slot; the least loaded one is chosen; the
catalogue bounds `max_batch` and refuses it where the batched engine cannot serve."""

import asyncio

import msgspec
import pytest

from services.inference.catalog import Catalog, ModelSpec
from services.inference.pool import ModelPool, Replica

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def _pool(max_batch: int, replicas: int) -> ModelPool:
    pool = ModelPool(spec=ModelSpec(name="m", replicas=replicas, max_batch=max_batch), threads=1, source_path="m.gguf")
    pool.replicas = [Replica(replica_id=f"m/{i}", actor=None, state="ready") for i in range(replicas)]
    return pool


async def test_a_replica_takes_up_to_max_batch_then_requests_wait():
    pool = _pool(3, 1)
    taken = [await pool.acquire() for _ in range(3)]
    assert {r.replica_id for r in taken} == {"m/0"} and taken[0].in_flight == 3
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done() and pool.queued == 1
    assert pool.stats()["utilisation"] == 1.0
    await pool.release(taken[0], 0.2)
    assert (await waiting).replica_id == "m/0" and pool.queued == 0


async def test_the_replica_with_most_free_slots_wins_even_if_it_served_more():
    pool = _pool(4, 2)
    pool.replicas[0].served, pool.replicas[1].served = 10, 0
    pool.replicas[1].in_flight = 2
    assert (await pool.acquire()).replica_id == "m/0"
    assert (await pool.acquire()).replica_id == "m/0"  # now 2 and 2: the one that served less
    assert (await pool.acquire()).replica_id == "m/1"


async def test_overlapping_requests_count_busy_time_once():
    pool = _pool(4, 1)
    replica = pool.replicas[0]
    for _ in range(4):
        await pool.acquire()
    for _ in range(4):
        await pool.release(replica, 1.0)  # four requests that all ran for the same second
    assert 0.99 <= replica.busy_s <= 1.01


def test_max_batch_is_bounded_and_only_for_llama_cpp_generation():
    assert ModelSpec(name="m").max_batch == 1 and ModelSpec(name="m").actor_concurrency == 1
    assert ModelSpec(name="m", max_batch=8).actor_concurrency == 9
    assert ModelSpec(name="m", backend="vllm", max_batch=4).max_batch == 4  # vLLM batches: its max_num_seqs
    for bad in ({"max_batch": 0}, {"max_batch": 65}, {"tensor_parallel_size": 2},
                {"max_batch": 4, "roles": ["embed"]}, {"max_batch": 4, "shards": 2}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"models": [{"name": "m", **bad}]}, Catalog)

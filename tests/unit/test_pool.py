"""Replica pools hand work to free replicas only, queue the rest, and fail fast when none can serve."""

import asyncio

import pytest

from services.inference.catalog import ModelSpec
from services.inference.pool import ModelPool, Replica
from shared.errors import Unavailable

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def _pool(states: list[str]) -> ModelPool:
    pool = ModelPool(spec=ModelSpec(name="m", replicas=len(states)), threads=1, source_path="m.gguf")
    pool.replicas = [Replica(replica_id=f"m/{i}", actor=None, state=s) for i, s in enumerate(states)]
    return pool


async def test_requests_go_to_free_replicas_and_the_rest_wait():
    pool = _pool(["ready", "ready"])
    first, second = await pool.acquire(), await pool.acquire()
    assert {first.replica_id, second.replica_id} == {"m/0", "m/1"}
    third = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    assert not third.done() and pool.queued == 1
    await pool.release(second, 0.5)
    assert (await third) is second and pool.queued == 0


async def test_least_served_free_replica_wins():
    pool = _pool(["ready", "ready", "ready"])
    pool.replicas[0].served, pool.replicas[1].served, pool.replicas[2].served = 5, 1, 3
    assert (await pool.acquire()).replica_id == "m/1"


async def test_a_restarting_replica_is_waited_for():
    pool = _pool(["restarting"])
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    pool.replicas[0].state = "ready"
    await pool.notify()
    assert (await waiting).replica_id == "m/0"


async def test_no_live_replica_is_503_at_once():
    pool = _pool(["failed", "failed"])
    with pytest.raises(Unavailable):
        await pool.acquire()


async def test_queued_requests_fail_when_the_last_replica_fails():
    pool = _pool(["restarting"])
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    pool.replicas[0].state = "failed"
    await pool.notify()
    with pytest.raises(Unavailable):
        await waiting


async def test_stats_report_queue_and_utilisation():
    pool = _pool(["ready", "ready"])
    await pool.acquire()
    assert pool.stats() == {"queued": 0, "in_flight": 1, "ready": 2, "utilisation": 0.5,
                            "retried": 0, "migrated": 0, "abandoned": 0}


async def test_a_draining_replica_takes_nothing_new_but_stays_live():
    pool = _pool(["ready", "ready"])
    pool.replicas[0].draining = True
    assert (await pool.acquire()).replica_id == "m/1"
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done(), "a draining replica is live: the request waits rather than failing"
    waiting.cancel()

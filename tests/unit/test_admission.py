"""Admission control: a model's queue is bounded, a request past the bound is refused at once with a retry hint
that survives the bus, and the gateway turns that hint into `Retry-After`."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from services.gateway import mapping
from services.gateway.metric_families import Snapshot, build
from services.inference.catalog import QUEUE_MIN, QUEUE_PER_SLOT, ModelSpec
from services.inference.pool import RETRY_AFTER_MAX_S, ModelPool, Replica
from services.orchestrator.desk import RETRY_AFTER_MIN_S, MissionDesk
from shared import errors

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def _pool(max_queue: int | None, replicas: int = 1, max_batch: int = 1) -> ModelPool:
    spec = ModelSpec(name="m", replicas=replicas, max_batch=max_batch, max_queue=max_queue)
    pool = ModelPool(spec=spec, threads=1, source_path="m.gguf")
    pool.replicas = [Replica(replica_id=f"m/{i}", actor=None, state="ready") for i in range(replicas)]
    return pool


async def _waiting(pool: ModelPool, n: int) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(pool.acquire()) for _ in range(n)]
    await asyncio.sleep(0.01)
    assert pool.queued == n and not any(t.done() for t in tasks)
    return tasks


def test_the_default_bound_scales_with_the_slots_and_zero_means_none():
    assert ModelSpec(name="m").queue_bound == QUEUE_MIN
    assert ModelSpec(name="m", replicas=2, max_batch=10).queue_bound == QUEUE_PER_SLOT * 20
    assert ModelSpec(name="m", max_queue=3).queue_bound == 3
    assert ModelSpec(name="m", max_queue=0).queue_bound == 0
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "m", "max_queue": -1}, ModelSpec)


async def test_past_the_bound_a_request_is_refused_at_once_and_the_admitted_ones_still_get_served():
    pool = _pool(max_queue=2)
    busy = await pool.acquire()
    waiting = await _waiting(pool, 2)
    with pytest.raises(errors.Unavailable) as refused:
        await pool.acquire()  # no wait: raised before queueing
    assert refused.value.retry_after_s and refused.value.retry_after_s > 0 and refused.value.field == "model"
    assert pool.refused == 1 and pool.queued == 2
    await pool.release(busy, 0.5)
    first = await waiting[0]
    again = asyncio.create_task(pool.acquire())  # one place free in the queue again: admitted
    await asyncio.sleep(0.01)
    assert not again.done() and pool.queued == 2
    for task in (waiting[1], again):
        await pool.release(first, 0.5)
        first = await task
    assert pool.refused == 1


async def test_a_retry_after_a_replica_died_is_never_refused():
    pool = _pool(max_queue=1)
    busy = await pool.acquire()
    waiting = await _waiting(pool, 1)
    retry = asyncio.create_task(pool.acquire(admitted=True))
    await asyncio.sleep(0.01)
    assert not retry.done() and pool.queued == 2
    await pool.release(busy, 0.1)
    await pool.release(await waiting[0], 0.1)
    assert (await retry).replica_id == "m/0" and pool.refused == 0


async def test_a_free_slot_admits_even_when_the_queue_count_is_at_the_bound():
    pool = _pool(max_queue=1, max_batch=4)
    held = [await pool.acquire() for _ in range(3)]  # a batched replica: slots free without any wait
    assert len({r.replica_id for r in held}) == 1 and pool.queued == 0


async def test_no_bound_lets_every_request_wait():
    pool = _pool(max_queue=0)
    busy = await pool.acquire()
    waiting = await _waiting(pool, 200)
    assert pool.refused == 0
    for task in waiting:
        await pool.release(busy, 0.0)
        busy = await task


async def test_the_retry_hint_is_the_time_the_queue_ahead_takes_to_drain():
    pool = _pool(max_queue=4, replicas=2)
    held = [await pool.acquire(), await pool.acquire()]
    await pool.release(held.pop(), 2.0)  # the first finished request sets the average: 2 s a slot
    held.append(await pool.acquire())
    await _waiting(pool, 4)
    with pytest.raises(errors.Unavailable) as refused:
        await pool.acquire()
    assert refused.value.retry_after_s == pytest.approx(4 * 2.0 / 2)  # 4 waiting, 2 slots, 2 s each
    pool.service_s = 1000.0
    assert pool.retry_after_s() == RETRY_AFTER_MAX_S  # never so long that a caller gives up


def test_the_hint_rides_in_the_error_body_and_survives_the_bus():
    error = errors.Unavailable("full", field="model", retry_after_s=2.5)
    body = msgspec.json.encode(error.body())
    assert msgspec.json.decode(body)["error"]["retry_after_s"] == 2.5
    rebuilt = errors.from_reply("503", "full", body)
    assert type(rebuilt) is errors.Unavailable and rebuilt.retry_after_s == 2.5 and rebuilt.field == "model"
    plain = errors.from_reply("503", "down", msgspec.json.encode(errors.Unavailable("down").body()))
    assert plain.retry_after_s is None and "retry_after_s" not in errors.Unavailable("down").body()["error"]
    for bad in (b'{"error": {"retry_after_s": "soon"}}', b'{"error": {"retry_after_s": -1}}', b"[1]", b"x"):
        assert errors.from_reply("503", "odd", bad).retry_after_s is None


@pytest.mark.parametrize("hint, header", [(2.5, "3"), (0.1, "1"), (7.0, "7"), (None, str(mapping.RETRY_AFTER_S[503]))])
def test_the_gateway_sends_the_services_hint_as_retry_after(hint, header):
    status, body, headers = mapping.http_error(errors.Unavailable("saturated", retry_after_s=hint))
    assert status == 503 and headers["Retry-After"] == header
    assert set(body["error"]) == {"message", "type", "param", "code"}  # OpenAI's shape, unchanged
    assert body["error"]["code"] == "service_unavailable"


def test_a_desk_hints_one_recent_mission_duration():
    desk = MissionDesk.__new__(MissionDesk)  # no bus needed for the hint
    desk.duration_s, desk.refused = 0.0, 0
    assert desk.retry_after_s() == 1.0  # nothing finished yet
    for seconds in (4.0, 4.0, 4.0):
        desk._finished(seconds)
    assert desk.retry_after_s() == pytest.approx(4.0)
    desk.duration_s = 0.01
    assert desk.retry_after_s() == RETRY_AFTER_MIN_S


def test_refusals_are_metrics():
    inference = {"name": "magi-inference", "id": "inf1", "endpoints": [
        {"subject": "magi.infer.generate", "data": {"models": {"m": {"queued": 4, "ready": 1, "refused": 9}}}}]}
    orchestrator = {"name": "magi-orchestrator", "id": "orch1", "endpoints": [
        {"subject": "magi.mission.run", "data": {"missions": {"ok": 1}, "missions_refused": 3}}]}
    families = {f.name: f for f in build(Snapshot(stats=[inference, orchestrator]))}
    refused = families["magi_inference_refused"].samples
    assert [(s.labels, s.value) for s in refused if s.name.endswith("_total")] == [
        ({"service_id": "inf1", "model": "m"}, 9.0)]
    missions = [s.value for s in families["magi_missions_refused"].samples if s.name.endswith("_total")]
    assert missions == [3.0]

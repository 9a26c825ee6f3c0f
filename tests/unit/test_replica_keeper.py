"""The replica keeper's decisions with stand-in actors (Ray and llama.cpp are exercised by the
integration tests): restart budgets that refill, warm-up deadlines, restarts that follow the
scheduler's placement, and make-before-break moves."""

import asyncio

import pytest
from ray.exceptions import RayActorError

from services.inference.budget import RestartBudget
from services.inference.catalog import ModelSpec
from services.inference.follow import Follower, moved
from services.inference.keeper import Keeper
from services.inference.pool import ModelPool, Replica
from shared.errors import Unavailable
from tests.unit.stand_ins import Clock, Method, pids

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

class FakeActor:
    """Answers like a replica actor: `warmup` (or hangs), `ping` (or raises as a dead actor does)."""

    def __init__(self, node: str, *, hang: bool = False) -> None:
        self.node, self.hang, self.dead, self.pid = node, hang, False, next(pids)
        self.warmup, self.ping = Method(self._warmup), Method(self._ping)

    async def _warmup(self) -> dict:
        if self.hang:
            await asyncio.sleep(3600)
        return {"node": self.node, "pid": self.pid}

    async def _ping(self) -> int:
        if self.dead:
            raise RayActorError()
        return self.pid


class Cluster:
    """Where the 'scheduler' places each replica, and every actor made and killed."""

    def __init__(self, node: str = "a", *, hang: bool = False) -> None:
        self.node, self.hang = node, hang
        self.made: list[FakeActor] = []
        self.killed: list[FakeActor] = []

    async def make(self, pool: ModelPool, index: int) -> Replica:
        actor = FakeActor(self.node, hang=self.hang)
        self.made.append(actor)
        return Replica(replica_id=f"{pool.spec.name}/{index}", actor=actor, node=self.node, placed=[self.node])

    async def where(self, replicas) -> dict[str, list[str]]:
        return {r.replica_id: [self.node] for _, r in replicas}

    def kill(self, actor) -> None:
        actor.dead = True
        self.killed.append(actor)


def _setup(cluster: Cluster, clock: Clock, *, warmup_timeout_s: float = 5.0):
    pool = ModelPool(spec=ModelSpec(name="m", replicas=1, warmup_timeout_s=warmup_timeout_s), threads=1,
                     source_path="m.gguf")
    keeper = Keeper(cluster.make, kill=cluster.kill, retry_pause_s=0)
    return pool, keeper


async def _started(pool: ModelPool, keeper: Keeper, cluster: Cluster, clock: Clock) -> Replica:
    replica = await cluster.make(pool, 0)
    replica.budget = RestartBudget(max_failures=2, stable_s=300, clock=clock)
    pool.replicas = [replica]
    assert await keeper.warm(pool, replica)
    return replica


async def _settle(keeper: Keeper) -> None:
    for _ in range(100):
        await asyncio.sleep(0)
    tasks = list(keeper._tasks.values())
    await asyncio.gather(*tasks)


def test_budget_allows_a_few_failures_in_a_row_then_refuses():
    clock = Clock()
    budget = RestartBudget(max_failures=3, stable_s=300, clock=clock)
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]
    assert budget.exhausted() and not budget.refilled()


def test_budget_starts_again_after_a_stable_stretch():
    clock = Clock()
    budget = RestartBudget(max_failures=2, stable_s=300, clock=clock)
    assert budget.spend() and budget.spend()
    clock.now += 299
    assert not budget.refilled()
    clock.now += 1
    assert budget.refilled() and not budget.exhausted()
    assert budget.spend() and budget.spent == 1  # the old failures no longer count


def test_failures_far_apart_never_exhaust_the_budget():
    clock = Clock()
    budget = RestartBudget(max_failures=2, stable_s=300, clock=clock)
    for _ in range(20):
        assert budget.spend()
        clock.now += 301


async def test_a_warm_up_that_hangs_is_killed_after_its_deadline():
    cluster, clock = Cluster(hang=True), Clock()
    pool, keeper = _setup(cluster, clock, warmup_timeout_s=0.05)
    replica = await cluster.make(pool, 0)
    assert not await keeper.warm(pool, replica)
    assert cluster.killed == [replica.actor] and replica.state == "starting"


async def test_a_dead_replica_starts_again_where_the_scheduler_now_places_it():
    cluster, clock = Cluster("a"), Clock()
    pool, keeper = _setup(cluster, clock)
    replica = await _started(pool, keeper, cluster, clock)
    old = replica.actor
    cluster.node = "b"  # node a died; the scheduler evacuated the replica to b
    keeper.lost(pool, replica, old)
    assert replica.state == "restarting"
    keeper.lost(pool, replica, old)  # the same death seen twice (request and ping) counts once
    await _settle(keeper)
    assert replica.state == "ready" and replica.node == "b" and replica.placed == ["b"]
    assert replica.restarts == 1 and old in cluster.killed and replica.actor is cluster.made[-1]


async def test_news_of_an_actor_already_replaced_is_ignored():
    cluster, clock = Cluster(), Clock()
    pool, keeper = _setup(cluster, clock)
    replica = await _started(pool, keeper, cluster, clock)
    keeper.lost(pool, replica, FakeActor("a"))
    assert replica.state == "ready" and replica.restarts == 0


async def test_warm_up_timeouts_spend_the_budget_then_the_replica_is_given_up_and_later_revived():
    cluster, clock = Cluster(), Clock()
    pool, keeper = _setup(cluster, clock, warmup_timeout_s=0.02)
    replica = await _started(pool, keeper, cluster, clock)
    cluster.hang = True  # every fresh actor now hangs while loading
    keeper.lost(pool, replica, replica.actor)
    await _settle(keeper)
    assert replica.state == "failed" and replica.restarts == 3  # the death, then two hung starts
    assert all(a in cluster.killed for a in cluster.made), "every hung actor is killed"
    with pytest.raises(Unavailable):
        await pool.acquire()
    follower = Follower([pool], keeper, cluster.where)
    follower.revive()
    assert replica.state == "failed", "not before a stable stretch"
    clock.now += 300
    cluster.hang = False
    follower.revive()
    await _settle(keeper)
    assert replica.state == "ready" and replica.restarts == 3


async def test_a_ping_finds_an_idle_replica_that_died():
    cluster, clock = Cluster(), Clock()
    pool, keeper = _setup(cluster, clock)
    replica = await _started(pool, keeper, cluster, clock)
    old = replica.actor
    old.dead = True
    await Follower([pool], keeper, cluster.where).ping()
    await _settle(keeper)
    assert replica.state == "ready" and replica.actor is not old and replica.restarts == 1


async def test_a_live_replica_moves_make_before_break_once_idle():
    cluster, clock = Cluster("a"), Clock()
    pool, keeper = _setup(cluster, clock)
    replica = await _started(pool, keeper, cluster, clock)
    old = replica.actor
    busy = await pool.acquire()  # a request is running on the old actor
    cluster.node = "b"  # node a was drained
    await Follower([pool], keeper, cluster.where).follow()
    for _ in range(50):
        await asyncio.sleep(0)
    fresh = cluster.made[-1]
    assert fresh is not old and replica.actor is old and old not in cluster.killed, "waits for the request"
    assert replica.draining and replica.state == "ready"
    await pool.release(busy, 0.1)
    await _settle(keeper)
    assert replica.actor is fresh and replica.node == "b" and replica.placed == ["b"]
    assert cluster.killed == [old] and not replica.draining and replica.restarts == 0
    assert (await pool.acquire()) is replica


async def test_a_move_that_cannot_warm_leaves_the_old_replica_serving():
    cluster, clock = Cluster("a"), Clock()
    pool, keeper = _setup(cluster, clock, warmup_timeout_s=0.02)
    replica = await _started(pool, keeper, cluster, clock)
    old = replica.actor
    cluster.node, cluster.hang = "b", True
    await Follower([pool], keeper, cluster.where).follow()
    await _settle(keeper)
    assert replica.actor is old and replica.state == "ready" and replica.node == "a"
    assert cluster.made[-1] in cluster.killed and old not in cluster.killed


def test_a_replica_moves_only_when_every_member_has_a_new_node():
    replica = Replica(replica_id="m/0", actor=None, placed=["a", "s1", "s2"])
    assert not moved(replica, ["a", "s1", "s2"])
    assert moved(replica, ["a", "s1", "s3"])  # a shard's node changed: the gang is rebuilt
    assert not moved(replica, ["", "s1", "s2"])  # the scheduler could not place it: leave it be
    assert not moved(replica, [])

"""The live catalogue's decisions without servers: what a catalogue change does to a running model (the
reconciler's plan), the autoscaler's choices, `magi models set|scale` input, and the router adding, draining
and removing replicas and models at run time with stand-in actors (Ray, llama.cpp and the bus are exercised
by tests/integration/test_live_catalog.py)."""

from __future__ import annotations

import asyncio

import pytest

from magi import cli_catalog
from services.inference import livecatalog
from services.inference.autoscale import Autoscaler, Load, decide
from services.inference.catalog import Autoscale, Catalog, ModelSpec
from services.inference.pool import ModelPool, Replica
from services.inference.reconcile import Plan, Reconciler, diff, plan, removal_order
from services.inference.router import Router
from shared.errors import BadRequest, NotFound
from tests.unit.stand_ins import Clock, Method, pids

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]

M = ModelSpec(name="m", replicas=1)


# ---- the reconciler's plan -------------------------------------------------------------------------

def test_a_new_model_is_added_and_a_missing_one_removed():
    assert plan(None, M) == Plan(add=True, replicas=1)
    assert plan(M, None) == Plan(remove=True)
    assert plan(None, None).noop and plan(M, ModelSpec(name="m", replicas=1)).noop


def test_a_replica_count_or_a_routing_setting_changes_in_place():
    scaled = plan(M, ModelSpec(name="m", replicas=3))
    assert scaled.in_place == ("replicas",) and not scaled.reload and scaled.replicas == 3
    routed = plan(M, ModelSpec(name="m", replicas=1, roles=["fast"], max_queue=5,
                               autoscale=Autoscale(max_replicas=3)))
    assert set(routed.in_place) == {"roles", "max_queue", "autoscale"} and not routed.reload


@pytest.mark.parametrize("change", [{"n_ctx": 4096}, {"threads": 1}, {"node": "n2"}, {"max_batch": 4},
                                    {"source": "store:other"}, {"digest": "sha256:" + "a" * 64}])
def test_a_setting_built_into_the_replicas_replaces_them(change):
    step = plan(M, ModelSpec(name="m", replicas=2, **change))
    assert step.reload == tuple(change) and step.in_place == ("replicas",) and step.replicas == 2


def test_roles_that_make_a_model_an_embedding_model_replace_its_replicas():
    assert plan(M, ModelSpec(name="m", roles=["embed"])).reload == ("roles",)


def test_diff_lists_only_models_that_change():
    running = {"a": ModelSpec(name="a"), "b": ModelSpec(name="b"), "c": ModelSpec(name="c")}
    wanted = {"a": ModelSpec(name="a"), "b": ModelSpec(name="b", replicas=2), "d": ModelSpec(name="d")}
    plans = diff(running, wanted)
    assert list(plans) == ["b", "c", "d"]
    assert plans["b"].replicas == 2 and plans["c"].remove and plans["d"].add


def test_a_scale_down_removes_replicas_not_serving_first_then_the_least_busy():
    replicas = [Replica(replica_id=f"m/{i}", actor=None, state=s, in_flight=f)
                for i, (s, f) in enumerate([("ready", 1), ("ready", 0), ("failed", 0), ("ready", 0)])]
    assert [r.replica_id for r in removal_order(replicas)] == ["m/2", "m/3", "m/1", "m/0"]


# ---- the autoscaler --------------------------------------------------------------------------------

POLICY = Autoscale(min_replicas=1, max_replicas=3, target_queue_per_slot=1.0, cooldown_s=10)


def _load(replicas=1, ready=None, slots=1, queued=0, in_flight=0) -> Load:
    return Load(replicas=replicas, ready=replicas if ready is None else ready, slots=slots, queued=queued,
                in_flight=in_flight)


def test_autoscaler_adds_a_replica_when_more_wait_per_slot_than_the_target():
    assert decide(POLICY, _load(queued=2, in_flight=1), since_change_s=60) == 2
    assert decide(POLICY, _load(queued=1, in_flight=1), since_change_s=60) == 1  # at the target, not above
    assert decide(POLICY, _load(replicas=2, slots=4, queued=9, in_flight=8), since_change_s=60) == 3


def test_autoscaler_respects_max_min_and_the_cool_down():
    assert decide(POLICY, _load(replicas=3, queued=50, in_flight=3), since_change_s=60) == 3
    assert decide(POLICY, _load(queued=5, in_flight=1), since_change_s=9) == 1
    assert decide(POLICY, _load(replicas=1), since_change_s=60) == 1  # idle at the minimum
    assert decide(POLICY, _load(replicas=5), since_change_s=0) == 3  # outside the bounds: back at once
    assert decide(Autoscale(min_replicas=2, max_replicas=4), _load(replicas=1), since_change_s=0) == 2


def test_autoscaler_removes_a_replica_only_when_nothing_waits_and_the_rest_would_be_half_free():
    assert decide(POLICY, _load(replicas=2, in_flight=0), since_change_s=60) == 1
    assert decide(POLICY, _load(replicas=2, in_flight=1), since_change_s=60) == 2  # 1 of 1 slot: full
    assert decide(POLICY, _load(replicas=3, in_flight=1), since_change_s=60) == 2
    assert decide(POLICY, _load(replicas=2, slots=4, in_flight=2), since_change_s=60) == 1
    assert decide(POLICY, _load(replicas=2, queued=1), since_change_s=60) == 2


def test_autoscaler_waits_while_a_change_is_still_under_way():
    assert decide(POLICY, _load(replicas=2, ready=1, queued=9), since_change_s=60) == 2


async def test_the_autoscaler_writes_the_catalogue_count_and_then_cools_down():
    clock = Clock()
    router = Router(Catalog(models=[]))
    pool = ModelPool(spec=ModelSpec(name="m", autoscale=POLICY), threads=1, source_path="m.gguf")
    pool.replicas = [Replica(replica_id="m/0", actor=None, state="ready", in_flight=1)]
    pool.queued = 4
    router.pools = {"m": pool, "plain": ModelPool(spec=ModelSpec(name="plain"), threads=1, source_path="p.gguf")}
    writes: list[tuple[str, int]] = []

    async def write(name: str, replicas: int) -> None:
        writes.append((name, replicas))

    scaler = Autoscaler(router, write, clock=clock)
    await scaler.tick()
    assert writes == []  # the first look starts the cool-down: a restarted service does not scale at once
    clock.now += 11
    await scaler.tick()
    assert writes == [("m", 2)]
    await scaler.tick()
    assert writes == [("m", 2)]


# ---- `magi models set|scale|add` input ---------------------------------------------------------------

def test_settings_parse_as_their_types_and_merge_nested_fields():
    changes = cli_catalog.parse_settings(["roles=heavy,fast", "n_ctx=4096", "node=7", "tensor_split=0.5,0.5",
                                          "n_gpu_layers=-1", "autoscale.max_replicas=3", "max_queue="])
    assert changes == {"roles": ["heavy", "fast"], "n_ctx": 4096, "node": "7", "tensor_split": [0.5, 0.5],
                       "n_gpu_layers": -1, "autoscale": {"max_replicas": 3}, "max_queue": None}
    raw = cli_catalog.with_settings({"name": "m", "autoscale": {"min_replicas": 2}}, changes)
    spec = livecatalog.validated(raw)
    assert spec.autoscale == Autoscale(min_replicas=2, max_replicas=3) and spec.node == "7"
    off = cli_catalog.with_settings(raw, cli_catalog.parse_settings(["autoscale=off"]))
    assert livecatalog.validated(off).autoscale is None
    assert livecatalog.validated({"name": "m", **cli_catalog.parse_settings(["autoscale=on"])}).autoscale == Autoscale()


@pytest.mark.parametrize("pairs,field", [
    (["n_ctx=5"], "n_ctx"), (["roles=heavy,slow"], "roles[1]"), (["colour=blue"], "colour"),
    (["name=other"], "name"), (["replicas=0"], "replicas"), (["replicas=two"], "replicas"),
    (["autoscale.min_replicas=3", "autoscale.max_replicas=2"], "autoscale"), (["n_ctx"], "settings"),
    (["autoscale.bogus=1"], "autoscale.bogus")])
def test_bad_settings_are_refused_naming_the_field(pairs, field):
    with pytest.raises(BadRequest) as refused:
        livecatalog.validated(cli_catalog.with_settings({"name": "m"}, cli_catalog.parse_settings(pairs)))
    assert refused.value.field == field


def test_scale_takes_a_count_or_a_step():
    assert [cli_catalog.scaled(2, s) for s in ("5", "+1", "-1")] == [5, 3, 1]
    with pytest.raises(BadRequest) as refused:
        cli_catalog.scaled(2, "lots")
    assert refused.value.field == "replicas"


def test_an_add_with_bad_settings_is_refused_before_any_upload():
    cli_catalog.check_add("tiny", cli_catalog.Options(roles="fast", replicas=2))
    with pytest.raises(BadRequest) as refused:
        cli_catalog.check_add("tiny", cli_catalog.Options(replicas=99))
    assert refused.value.field == "replicas"


def test_model_names_map_to_keys_and_back():
    assert livecatalog.key_of("qwen:7b") == "qwen=7b" and livecatalog.name_of("qwen=7b") == "qwen:7b"
    spec = ModelSpec(name="qwen:7b", n_ctx=4096)
    assert livecatalog.decode(livecatalog.encode(spec)) == spec
    with pytest.raises(BadRequest):
        livecatalog.key_of("a..b")


# ---- the router at run time, with stand-in actors -----------------------------------------------------

class FakeActor:
    """A replica actor whose generations finish when the test opens `gate`."""

    def __init__(self, node: str, spec: ModelSpec) -> None:
        self.node, self.pid, self.spec, self.killed = node, next(pids), spec, False
        self.gate = asyncio.Event()
        self.gate.set()
        self.warmup, self.ping, self.abort = Method(self._warmup), Method(self._ping), Method(lambda _: None)
        self.generate = Method(self._generate)

    async def _warmup(self) -> dict:
        return {"node": self.node, "pid": self.pid}

    async def _ping(self) -> int:
        return self.pid

    async def _generate(self, params: dict, request_id: str) -> dict:
        await self.gate.wait()
        return {"text": "ok", "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop"}


class Cluster:
    """Places every replica on `node` (changeable: a node that joined), records actors made and killed and the
    placements released."""

    def __init__(self) -> None:
        self.node = "a"
        self.made: list[FakeActor] = []
        self.released: list[str] = []

    async def make(self, pool: ModelPool, index: int) -> Replica:
        actor = FakeActor(self.node, pool.spec)
        self.made.append(actor)
        return Replica(replica_id=f"{pool.spec.name}/{index}", actor=actor, node=self.node, placed=[self.node])

    def kill(self, actor: FakeActor) -> None:
        actor.killed = True

    async def release(self, pool: ModelPool, replicas: list[Replica]) -> None:
        self.released += [r.replica_id for r in replicas]


class StandInRouter(Router):
    async def open_pool(self, spec: ModelSpec) -> ModelPool:  # no weights or tokenizer to read
        return ModelPool(spec=spec, threads=1, source_path=f"{spec.name}.gguf")


async def _router(*specs: ModelSpec) -> tuple[Router, Cluster]:
    cluster = Cluster()
    router = StandInRouter(Catalog(models=list(specs)), follow_interval_s=3600)
    await router.start(cluster.make, release=cluster.release)
    router.keeper.kill = cluster.kill
    return router, cluster


def _ready(pool: ModelPool) -> list[str]:
    return sorted(r.replica_id for r in pool.replicas if r.state == "ready")


async def test_a_model_added_at_run_time_serves_and_a_removed_one_drains_then_404s():
    router, cluster = await _router(M)
    try:
        pool = await router.add_model(ModelSpec(name="new", replicas=2))
        assert _ready(pool) == ["new/0", "new/1"] and router.resolve("new", None) is pool
        actor = pool.replicas[0].actor
        actor.gate.clear()
        running = asyncio.create_task(router.generate(pool, {}, "r1"))
        await asyncio.sleep(0.01)
        removing = asyncio.create_task(router.remove_model("new", drain_timeout_s=10))
        await asyncio.sleep(0.01)
        with pytest.raises(NotFound) as unknown:
            router.resolve("new", None)
        assert unknown.value.field == "model"
        assert not removing.done() and not actor.killed  # the request in flight holds the replicas
        actor.gate.set()
        replica, out, _ = await running
        await removing
        assert out["text"] == "ok" and actor.killed and sorted(cluster.released) == ["new/0", "new/1"]
    finally:
        await router.close()


async def test_a_replica_removed_stops_taking_work_finishes_its_request_then_stops():
    router, cluster = await _router(ModelSpec(name="m", replicas=2))
    try:
        pool = router.pools["m"]
        busy = pool.replicas[1]
        busy.actor.gate.clear()
        busy.in_flight = 0
        first = asyncio.create_task(router.generate(pool, {}, "r1"))  # the least served: m/0
        second = asyncio.create_task(router.generate(pool, {}, "r2"))
        pool.replicas[0].actor.gate.clear()
        await asyncio.sleep(0.01)
        assert busy.in_flight == 1
        removing = asyncio.create_task(router.remove_replica(pool, busy, drain_timeout_s=10))
        await asyncio.sleep(0.01)
        assert busy.state == "draining" and not busy.actor.killed and pool._free() is None
        busy.actor.gate.set()
        pool.replicas[0].actor.gate.set()
        await asyncio.gather(first, second, removing)
        assert busy.actor.killed and busy not in pool.replicas and cluster.released == ["m/1"]
    finally:
        await router.close()


async def test_a_replica_that_will_not_drain_is_stopped_at_its_deadline():
    router, _ = await _router(M)
    try:
        pool = router.pools["m"]
        stuck = pool.replicas[0]
        stuck.in_flight = 1
        await router.remove_replica(pool, stuck, drain_timeout_s=0.05)
        assert stuck.actor.killed and pool.replicas == []
    finally:
        await router.close()


async def test_reconciler_scales_up_then_down_placing_new_replicas_where_the_scheduler_says_now():
    router, cluster = await _router(M)
    reconciler = Reconciler(router, drain_timeout_s=5)
    try:
        cluster.node = "joined"  # a node that joined after the start
        reconciler.want("m", ModelSpec(name="m", replicas=3))
        await reconciler.settled()
        pool = router.pools["m"]
        assert _ready(pool) == ["m/0", "m/1", "m/2"]
        assert [r.node for r in pool.replicas] == ["a", "joined", "joined"]
        reconciler.want("m", ModelSpec(name="m", replicas=1))
        await reconciler.settled()
        assert len(pool.replicas) == 1 and sorted(cluster.released) == ["m/1", "m/2"]
        reconciler.want("m", ModelSpec(name="m", replicas=2))
        await reconciler.settled()
        assert _ready(pool) == ["m/0", "m/1"]  # the freed index is used again
    finally:
        await reconciler.close()
        await router.close()


async def test_reconciler_replaces_replicas_one_at_a_time_keeping_the_model_serving():
    router, cluster = await _router(ModelSpec(name="m", replicas=2))
    reconciler = Reconciler(router, drain_timeout_s=5)
    pool = router.pools["m"]
    lowest_ready: list[int] = []

    async def watch() -> None:
        while True:
            lowest_ready.append(len(_ready(pool)))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        old = [r.actor for r in pool.replicas]
        reconciler.want("m", ModelSpec(name="m", replicas=2, n_ctx=4096))
        await reconciler.settled()
        assert all(a.killed for a in old) and len(pool.replicas) == 2
        assert all(r.actor.spec.n_ctx == 4096 and r.revision == pool.revision == 1 for r in pool.replicas)
        assert min(lowest_ready) >= 2  # a new replica is ready before an old one leaves
    finally:
        watcher.cancel()
        await reconciler.close()
        await router.close()


async def test_reconciler_adds_and_removes_whole_models():
    router, cluster = await _router(M)
    reconciler = Reconciler(router, drain_timeout_s=5)
    try:
        reconciler.want("other", ModelSpec(name="other", roles=["fast"]))
        await reconciler.settled()
        assert _ready(router.pools["other"]) == ["other/0"]
        reconciler.want("m", None)
        await reconciler.settled()
        assert list(router.pools) == ["other"] and cluster.released == ["m/0"]
        assert [m.name for m in router.catalog.models] == ["other"]
    finally:
        await reconciler.close()
        await router.close()


async def test_a_change_that_failed_is_tried_again_by_the_resync():
    router, _ = await _router(M)
    reconciler = Reconciler(router, drain_timeout_s=5)
    missing = {"late"}  # its weights are not there yet

    async def open_pool(spec: ModelSpec) -> ModelPool:
        if spec.name in missing:
            raise NotFound(f"no weights for {spec.name}", field="source")
        return ModelPool(spec=spec, threads=1, source_path=f"{spec.name}.gguf")

    router.open_pool = open_pool
    try:
        reconciler.want("late", ModelSpec(name="late", roles=["fast"]))
        await reconciler.settled()
        assert "late" not in router.pools and reconciler.resync() == ["late"]
        await reconciler.settled()
        missing.clear()
        assert reconciler.resync() == ["late"]
        await reconciler.settled()
        assert _ready(router.pools["late"]) == ["late/0"] and reconciler.resync() == []
    finally:
        await reconciler.close()
        await router.close()

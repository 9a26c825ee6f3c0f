"""Requests that cannot fit a model's context window are refused with 400 naming the field, before
any replica sees them; the boundary is exact (the service counts the tokens its replicas count)."""

import pytest

from protos.infer import EmbedReply, EmbedRequest, GenerateReply, GenerateRequest, ModelsReply, StreamChunk
from shared import bus
from shared.errors import BadRequest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N_CTX = 2048  # the default catalogue's generation model (the embedder's is 512)


async def _all_ready(nc) -> bool:
    reply = await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)
    return all(r.state == "ready" for m in reply.models for r in m.replicas)


async def test_a_prompt_longer_than_the_context_is_400_and_the_service_stays_up(nc):
    request = GenerateRequest(model="smollm2-135m", prompt="word " * 3000, max_tokens=8)
    with pytest.raises(BadRequest) as info:
        await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=30)
    assert info.value.field == "prompt" and str(N_CTX) in info.value.message
    reply = await bus.request(nc, "magi.infer.generate", GenerateRequest(prompt="Hi", max_tokens=4),
                              GenerateReply, timeout=60)
    assert reply.usage.completion_tokens > 0 and reply.attempts == 1
    assert await _all_ready(nc)


async def test_prompt_plus_max_tokens_may_fill_the_context_exactly_but_not_more(nc):
    base = GenerateRequest(prompt="Say hi.", max_tokens=2, temperature=0.0, stop=[".", "!", "\n"])
    used = (await bus.request(nc, "magi.infer.generate", base, GenerateReply, timeout=60)).usage.prompt_tokens
    assert used > 0
    fits = GenerateRequest(prompt="Say hi.", max_tokens=N_CTX - used, temperature=0.0, stop=[".", "!", "\n"],
                           timeout_s=60)
    assert (await bus.request(nc, "magi.infer.generate", fits, GenerateReply, timeout=90)).usage.prompt_tokens == used
    over = GenerateRequest(prompt="Say hi.", max_tokens=N_CTX - used + 1)
    with pytest.raises(BadRequest) as info:
        await bus.request(nc, "magi.infer.generate", over, GenerateReply, timeout=30)
    assert info.value.field == "max_tokens" and f"at most {N_CTX - used}" in info.value.message
    streamed = GenerateRequest(prompt="Say hi.", max_tokens=N_CTX - used + 1, stream=True)
    with pytest.raises(BadRequest):
        async for _ in bus.stream_request(nc, "magi.infer.generate", streamed, StreamChunk, GenerateReply, timeout=30):
            pass


async def test_an_embedding_text_over_the_embedders_context_is_400(nc):
    texts = ["a short text", "word " * 600]
    with pytest.raises(BadRequest) as info:
        await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=30)
    assert info.value.field == "texts" and "texts[1]" in info.value.message
    reply = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts[:1]), EmbedReply, timeout=30)
    assert len(reply.vectors) == 1
    assert await _all_ready(nc)

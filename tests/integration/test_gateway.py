"""The OpenAI-compatible gateway, driven by the official `openai` client against the session stack."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import subprocess
import sys
import time
from urllib.parse import urlparse

import numpy as np
import openai
import pytest

from magi import stack
from magi.procs import free_port, stop_tree
from protos.gateway import GatewayInfo
from protos.infer import EmbedReply, EmbedRequest, ModelsReply
from shared import bus
from tests import reference_minilm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "smollm2-135m"
PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
async def client(gateway_url, api_key):
    async with openai.AsyncOpenAI(base_url=gateway_url, api_key=api_key, max_retries=0, timeout=120) as c:
        yield c


def _raw(gateway_url: str, method: str, path: str, body: bytes | None, key: str | None,
         timeout: float = 60) -> tuple[int, dict, dict]:
    url = urlparse(gateway_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, url.path + path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _is_openai_error(body: dict) -> bool:
    error = body.get("error", {})
    return set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


async def test_models_lists_real_models_and_mission_pseudo_models(client):
    ids = {m.id async for m in client.models.list()}
    assert {MODEL, "all-minilm-l6-v2", "magi-mission", "magi-mission:synthesize", "magi-mission:medoid",
            "magi-mission:majority", "magi-mission:longest"} <= ids


async def test_chat_non_streamed_reports_usage(client):
    reply = await client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12, temperature=0, seed=7)
    assert reply.object == "chat.completion" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_streamed_chunks_concatenate_to_the_non_streamed_answer(client):
    args = dict(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0, seed=11, stop=["\n\n\n"])
    await client.chat.completions.create(**args)  # kept by the batched replica: both runs below reuse it
    whole = await client.chat.completions.create(**args)
    stream = await client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, chunks = [], None, None, 0
    async for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert chunks > 3, "expected the answer in several chunks"
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


async def test_n_choices_each_with_its_own_seed(client):
    reply = await client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, temperature=0.9,
                                                 seed=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert 2 <= reply.usage.completion_tokens <= 16  # both choices counted


async def test_legacy_completions_streamed_and_not(client):
    # A first run leaves the prompt in a slot of the batched replica; both runs compared below reuse it.
    await client.completions.create(model=MODEL, prompt="Say hello.", max_tokens=10, temperature=0, seed=5)
    reply = await client.completions.create(model=MODEL, prompt="Say hello.", max_tokens=10, temperature=0, seed=5)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.completion_tokens > 0
    stream = await client.completions.create(model=MODEL, prompt="Say hello.", max_tokens=10, temperature=0, seed=5,
                                             stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == reply.choices[0].text


async def test_embeddings_match_the_bus(client, nc):
    texts = ["A man is eating food.", "A man is eating a piece of bread."]
    direct = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=30)
    expected = np.array(direct.vectors, dtype=np.float32)
    plain = await client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    packed = await client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="base64")
    # Unless told, the openai client asks for base64 and decodes it itself.
    default = await client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    for vectors in ([d.embedding for d in plain.data], [d.embedding for d in default.data],
                    [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data]):
        vectors = np.array(vectors, dtype=np.float32)
        assert vectors.shape == (2, 384)
        np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    # usage counts the model's own tokens ([CLS] ... [SEP]), as the reference tokenizer does
    tokens = sum(len(reference_minilm.token_ids(t)) for t in texts)
    assert direct.prompt_tokens == tokens and plain.usage.prompt_tokens == plain.usage.total_tokens == tokens


async def test_mission_pseudo_model_returns_consensus_and_clones(client):
    reply = await client.chat.completions.create(
        model="magi-mission:medoid", max_tokens=24,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is NATS?"}],
        extra_body={"magi": {"variations": ["in one line", "in a few words"]}})
    magi = reply.model_extra["magi"]
    assert reply.choices[0].message.content == magi["consensus"]["answer"]
    assert magi["consensus"]["strategy"] == "medoid" and magi["consensus"]["id"].startswith("consensus:")
    assert len(magi["clones"]) == 2 and all("clone_id" in c for c in magi["clones"])
    assert magi["mission_id"] and "cited" in magi
    assert reply.usage.completion_tokens == sum(c["completion_tokens"] for c in magi["clones"])


async def test_streamed_mission_sends_clone_progress_then_the_answer(gateway_url, api_key):
    body = json.dumps({"model": "magi-mission:longest", "stream": True, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Why is the sky blue?"}],
                       "magi": {"variations": ["in one line", "in a few words"]}}).encode()
    url = urlparse(gateway_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request("POST", url.path + "/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        lines = response.read().decode().splitlines()
    finally:
        conn.close()
    comments = [line for line in lines if line.startswith(": clone")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert len(comments) == 2, lines
    assert "data: [DONE]" in lines
    answer = "".join(c["choices"][0]["delta"].get("content", "") for c in events if c["choices"])
    last = [e for e in events if "magi" in e][-1]
    assert answer == last["magi"]["consensus"]["answer"] and last["choices"][0]["finish_reason"] == "stop"


async def test_a_bad_key_is_401(gateway_url):
    async with openai.AsyncOpenAI(base_url=gateway_url, api_key="not-a-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    status, _, body = _raw(gateway_url, "GET", "/models", None, None)
    assert status == 401 and _is_openai_error(body)


async def test_an_unknown_model_is_404(client):
    for model in ("no-such-model", "magi-mission:vote"):
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model=model, messages=PROMPT, max_tokens=4)
        assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=4, stream=True)


async def test_malformed_requests_are_400_in_openais_shape(client, gateway_url, api_key):
    status, _, body = _raw(gateway_url, "POST", "/chat/completions", b"{not json", api_key)
    assert status == 400 and _is_openai_error(body) and body["error"]["type"] == "invalid_request_error"
    status, _, body = _raw(gateway_url, "POST", "/chat/completions", json.dumps({"model": MODEL}).encode(), api_key)
    assert status == 400 and body["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:  # longer than the model's 2048-token window
        await client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4096)
    assert info.value.param == "max_tokens"
    status, _, body = _raw(gateway_url, "GET", "/nothing-here", None, api_key)
    assert status == 404 and _is_openai_error(body)


async def _in_flight(nc) -> int:
    models = await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)
    return sum(r.in_flight for m in models.models for r in m.replicas) + sum(m.queued for m in models.models)


async def test_closing_a_stream_cancels_its_generation(client, nc):
    before = await bus.request(nc, "magi.gateway.info", b"{}", GatewayInfo, timeout=5)
    stream = await client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "Write a very long story about a dragon."}], max_tokens=1500, temperature=0.8,
        stream=True)
    got = 0
    async for chunk in stream:
        got += 1
        if got == 4:
            break
    assert await _in_flight(nc) >= 1, "the generation should still be running"
    await stream.close()
    started = time.monotonic()
    while await _in_flight(nc) and time.monotonic() - started < 10:
        await asyncio.sleep(0.05)
    # 1500 tokens take tens of seconds here: back to idle this soon means the generation was stopped.
    assert await _in_flight(nc) == 0, "the generation was not cancelled"
    assert time.monotonic() - started < 5
    after = await bus.request(nc, "magi.gateway.info", b"{}", GatewayInfo, timeout=5)
    assert after.cancelled == before.cancelled + 1 and after.in_flight == 0


async def test_a_client_leaving_a_non_streamed_request_cancels_its_generation(gateway_url, api_key, nc):
    before = await bus.request(nc, "magi.gateway.info", b"{}", GatewayInfo, timeout=5)
    body = json.dumps({"model": MODEL, "max_tokens": 1500, "temperature": 0.8,
                       "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}).encode()
    with pytest.raises(TimeoutError):  # the client gives up after 1.5 s and closes its connection
        await asyncio.to_thread(_raw, gateway_url, "POST", "/chat/completions", body, api_key, 1.5)
    started = time.monotonic()
    while await _in_flight(nc) and time.monotonic() - started < 10:
        await asyncio.sleep(0.05)
    # 1500 tokens take tens of seconds here: back to idle this soon means the generation was stopped.
    assert await _in_flight(nc) == 0, "the generation was not cancelled"
    assert time.monotonic() - started < 5
    after = await bus.request(nc, "magi.gateway.info", b"{}", GatewayInfo, timeout=5)
    assert after.cancelled == before.cancelled + 1 and after.in_flight == 0


@pytest.fixture
def tiny_gateway(magi_stack):
    """A second gateway on the same bus that serves one request at a time."""
    port = free_port()
    env = dict(os.environ, MAGI_NATS_URL=magi_stack.nats_url, MAGI_HOME=magi_stack.home, MAGI_HTTP_PORT=str(port),
               MAGI_HTTP_CONCURRENCY="1", MAGI_LOG_LEVEL="WARNING")
    env.pop("MAGI_NATS_CREDS", None)
    env.pop("MAGI_API_KEYS_FILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the second gateway did not start"
        time.sleep(0.1)
    yield url
    stop_tree(proc.pid, grace=10)


async def test_over_the_concurrency_limit_is_429_with_retry_after(tiny_gateway, api_key):
    async with openai.AsyncOpenAI(base_url=tiny_gateway, api_key=api_key, max_retries=0, timeout=60) as busy:
        await _hold_a_slot_and_see_429(busy, tiny_gateway, api_key)


async def _hold_a_slot_and_see_429(busy, tiny_gateway, api_key):
    stream = await busy.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=200, stream=True)
    try:
        await anext(aiter(stream))
        status, headers, body = await asyncio.to_thread(
            _raw, tiny_gateway, "POST", "/chat/completions",
            json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": 4}).encode(), api_key)
        assert status == 429 and _is_openai_error(body) and body["error"]["type"] == "rate_limit_error"
        assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            await busy.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4)
    finally:
        await stream.close()
    for _ in range(50):  # the slot is free again once the stream is gone
        status, _, _ = await asyncio.to_thread(
            _raw, tiny_gateway, "POST", "/chat/completions",
            json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": 2}).encode(), api_key)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200


async def test_the_gateway_identity_may_only_do_its_part(magi_stack):
    refused: list[str] = []

    async def note(exc: Exception) -> None:
        refused.append(str(exc).lower())

    gw = await stack.connect_as(magi_stack.home, magi_stack.nats_url, "gateway", error_cb=note)
    client = await stack.connect_as(magi_stack.home, magi_stack.nats_url, "client", error_cb=note)
    try:
        assert gw.new_inbox().startswith("_INBOX.gateway.")
        models = await bus.request(gw, "magi.infer.models", b"{}", ModelsReply, timeout=5)
        assert models.models
        await gw.publish("magi.memory.delete", b'{"all": true}')
        await gw.publish("magi.sched.drain", b'{"node": "testnode"}')
        await client.subscribe("_INBOX.gateway.>")  # a client may not read the gateway's replies
        await gw.flush()
        await client.flush()
        for _ in range(40):
            if len(refused) >= 3:
                break
            await asyncio.sleep(0.05)
        text = "\n".join(refused)
        assert 'publish to "magi.memory.delete"' in text and 'publish to "magi.sched.drain"' in text
        assert 'subscription to "_inbox.gateway.>"' in text
    finally:
        await gw.close()
        await client.close()

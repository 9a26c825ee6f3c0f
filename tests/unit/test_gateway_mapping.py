"""The gateway's pure translation: OpenAI requests to bus contracts, errors to HTTP, API keys."""

from __future__ import annotations

import base64
import json

import msgspec
import numpy as np
import pytest

from protos.common import Usage
from protos.infer import ChatMessage, GenerateReply
from services.gateway import mapping
from services.gateway.keys import ApiKeys, bearer, parse_keys
from services.gateway.schema import ChatRequest, CompletionRequest, EmbeddingRequest, MissionOptions
from shared import errors

pytestmark = pytest.mark.unit


def chat(**fields) -> ChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatRequest)


@pytest.mark.parametrize("exc, status, kind, code", [
    (errors.BadRequest("x", field="temperature"), 400, "invalid_request_error", "invalid_request"),
    (mapping.Unauthorized("x"), 401, "invalid_request_error", "invalid_api_key"),
    (errors.Forbidden("x"), 500, "server_error", "internal_error"),
    (errors.NotFound("unknown model", field="model"), 404, "invalid_request_error", "model_not_found"),
    (errors.PayloadTooLarge("x"), 413, "invalid_request_error", "payload_too_large"),
    (mapping.TooManyRequests("x"), 429, "rate_limit_error", "rate_limit_exceeded"),
    (errors.Unavailable("x"), 503, "server_error", "service_unavailable"),
    (errors.DeadlineExceeded("x"), 504, "server_error", "deadline_exceeded"),
    (TimeoutError(), 504, "server_error", "deadline_exceeded"),
    (RuntimeError("secret detail <object at 0x1>"), 500, "server_error", "internal_error"),
])
def test_errors_map_to_openai_shape_and_status(exc, status, kind, code):
    got, body, headers = mapping.http_error(exc)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind and body["error"]["code"] == code
    assert "0x1" not in body["error"]["message"]  # never a repr of the exception
    assert ("Retry-After" in headers) == (status in (429, 503))


def test_a_bad_field_is_the_param_and_malformed_json_has_none():
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"model": "m", "messages": [], "temperature": 1}', type=ChatRequest)
    _, body, _ = mapping.http_error(info.value)
    assert body["error"]["param"] == "messages"
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(b"{nope", type=ChatRequest)
    assert mapping.http_error(info.value)[1]["error"]["param"] is None


def test_mission_model_names():
    assert mapping.mission_strategy("smollm2-135m") is None
    assert mapping.mission_strategy("magi-mission") == "synthesize"
    assert mapping.mission_strategy("magi-mission:majority") == "majority"
    with pytest.raises(errors.NotFound):
        mapping.mission_strategy("magi-mission:vote")
    assert set(mapping.pseudo_models()) == {"magi-mission", *(f"magi-mission:{s}" for s in mapping.STRATEGIES)}


def test_generate_request_carries_sampling_and_offsets_the_seed_per_choice():
    req = chat(max_tokens=9, temperature=0, top_p=0.5, stop="END", seed=40, stream=True)
    messages = mapping.chat_messages(req.messages)
    g = mapping.generate_request(req, index=2, request_id="gw-1", timeout_s=30, messages=messages)
    assert (g.max_tokens, g.temperature, g.top_p, g.stop, g.seed, g.stream, g.request_id) == \
        (9, 0, 0.5, ["END"], 42, True, "gw-1")
    defaults = mapping.generate_request(chat(), index=0, request_id="r", timeout_s=30, messages=messages)
    assert (defaults.max_tokens, defaults.temperature, defaults.top_p, defaults.seed) == \
        (mapping.DEFAULT_MAX_TOKENS, 1.0, 1.0, None)
    assert mapping.max_tokens(chat(max_tokens=5, max_completion_tokens=7)) == 7


def test_messages_text_parts_and_roles():
    req = chat(messages=[{"role": "developer", "content": "be short"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert mapping.chat_messages(req.messages) == [ChatMessage(role="system", content="be short"),
                                                   ChatMessage(role="user", content="ab")]
    with pytest.raises(errors.BadRequest) as info:
        mapping.chat_messages(chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]).messages)
    assert info.value.field == "messages[0].content[0].type"
    with pytest.raises(errors.BadRequest):
        mapping.chat_messages(chat(messages=[{"role": "tool", "content": "x"}]).messages)


def test_what_magi_cannot_do_is_refused_by_name():
    for fields, name in (({"presence_penalty": 0.5}, "presence_penalty"), ({"logprobs": True}, "logprobs"),
                         ({"tools": [{"type": "function"}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(errors.BadRequest) as info:
            mapping.check_supported(chat(**fields))
        assert info.value.field == name
    mapping.check_supported(chat(presence_penalty=0, response_format={"type": "text"}))
    with pytest.raises(errors.BadRequest):
        mapping.check_supported(msgspec.convert({"model": "m", "prompt": "x", "echo": True}, CompletionRequest))


def test_mission_prompt_is_the_last_question_with_earlier_turns_as_context():
    one = [ChatMessage(role="user", content="Why?")]
    assert mapping.mission_prompt(one) == "Why?"
    turns = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="What is NATS?"),
             ChatMessage(role="assistant", content="A message bus."), ChatMessage(role="user", content="Who wrote it?")]
    prompt = mapping.mission_prompt(turns)
    assert prompt.endswith("Question: Who wrote it?") and "assistant: A message bus." in prompt
    long = [ChatMessage(role="user", content="x" * 10000), ChatMessage(role="user", content="y" * 10000)]
    assert mapping.mission_prompt(long) == "y" * 10000  # the earlier turn does not fit and is dropped
    with pytest.raises(errors.BadRequest):
        mapping.mission_prompt([ChatMessage(role="system", content="no question")])


def test_mission_request_validates_options_before_anything_runs():
    m = mapping.mission_request("q", "medoid", MissionOptions(variations=["a", "b"], context_needed=True), 20)
    assert (m.consensus, m.variations, m.context_needed, m.max_tokens) == ("medoid", ["a", "b"], True, 20)
    assert mapping.mission_request("q", "medoid", MissionOptions(consensus="longest"), None).consensus == "longest"
    with pytest.raises(errors.BadRequest) as info:
        mapping.mission_request("q", "medoid", MissionOptions(namespace="bad space"), None)
    assert info.value.field == "magi.namespace"


def _reply(text: str, prompt: int, completion: int, finish: str = "stop") -> GenerateReply:
    return GenerateReply(text=text, model="m", node="n", replica="r", latency_ms=1.0, finish_reason=finish,
                         usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                                     total_tokens=prompt + completion))


def test_completion_bodies_and_usage():
    body = mapping.chat_completion("chatcmpl-1", "m", [_reply("a", 3, 2), _reply("b", 3, 4, "length")])
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}
    text = mapping.text_completion("cmpl-1", "m", [_reply("x", 1, 1, "cancelled")])
    assert text["object"] == "text_completion" and text["choices"][0]["finish_reason"] == "stop"
    first = mapping.chunk("chat", "c", 1, "m", 0, role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert mapping.chunk("chat", "c", 1, "m", 0, text="hi")["choices"][0]["delta"] == {"content": "hi"}
    assert mapping.chunk("text", "c", 1, "m", 1, text="hi")["choices"][0] == {
        "index": 1, "text": "hi", "logprobs": None, "finish_reason": None}


def test_embeddings_float_and_base64():
    vectors = [[0.5, -1.25, 3.0]]
    assert mapping.embeddings("e", vectors, "float")["data"][0]["embedding"] == vectors[0]
    packed = mapping.embeddings("e", vectors, "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(packed), dtype="<f4").tolist() == vectors[0]
    assert msgspec.convert({"model": "e", "input": "x"}, EmbeddingRequest).encoding_format == "float"


def test_keys_file_formats(tmp_path):
    assert parse_keys("# comment\nkey-one\n\n  key-two  \n") == ["key-one", "key-two"]
    assert parse_keys('["a", "b"]') == ["a", "b"]
    assert parse_keys('{"keys": ["a", {"key": "b", "name": "ci"}]}') == ["a", "b"]
    assert bearer("Bearer abc") == "abc" and bearer("bearer abc") == "abc"
    assert bearer("Basic abc") == "" and bearer(None) == ""
    path = tmp_path / "api_key"
    keys = ApiKeys(path)
    assert not keys.check("Bearer anything")  # no file: nothing is let in
    path.write_text("k1\n")
    keys._reload()
    assert keys.check("Bearer k1") and not keys.check("Bearer k2") and not keys.check("Bearer ")
    assert not keys.check(None)

"""Pure translation between OpenAI's HTTP API and MAGI's bus contracts (no I/O here; unit-tested).

Errors: every failure is a `shared.errors.MagiError` (the bus's own, or one raised here) and
`http_error` is the one place that turns it into an HTTP status, OpenAI's error JSON and headers.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any, get_args

import msgspec
import numpy as np

from protos.consensus import Strategy
from protos.infer import ChatMessage, GenerateReply, GenerateRequest
from protos.mission import MissionReply, MissionRequest
from services.gateway.schema import ChatRequest, CompletionRequest, Message, MissionOptions
from shared import errors

MISSION_MODEL = "magi-mission"
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DEFAULT_STRATEGY = "synthesize"  # the mission default
DEFAULT_MAX_TOKENS = 256  # when a request names none (OpenAI: the model's whole window)
MAX_MISSION_PROMPT = 16384  # MissionRequest.prompt's limit
RETRY_AFTER_S = {429: 1, 503: 2}


class Unauthorized(errors.MagiError):
    code, kind = 401, "unauthorized"


class TooManyRequests(errors.MagiError):
    code, kind = 429, "rate_limited"


# MagiError code -> (HTTP status, OpenAI error type, OpenAI error code)
_HTTP: dict[int, tuple[int, str, str]] = {
    400: (400, "invalid_request_error", "invalid_request"),
    401: (401, "invalid_request_error", "invalid_api_key"),
    # 403 on the bus means nats-server refused the gateway's own identity: the server's fault, not the caller's.
    403: (500, "server_error", "internal_error"),
    404: (404, "invalid_request_error", "not_found"),
    413: (413, "invalid_request_error", "payload_too_large"),
    422: (422, "invalid_request_error", "unprocessable"),
    429: (429, "rate_limit_error", "rate_limit_exceeded"),
    500: (500, "server_error", "internal_error"),
    503: (503, "server_error", "service_unavailable"),
    504: (504, "server_error", "deadline_exceeded"),
}


def http_error(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, OpenAI error body, headers) for any exception; unknown ones are a generic 500 (logged once,
    by `errors.translate`, never echoed)."""
    error = errors.translate(exc)
    status, kind, code = _HTTP.get(error.code, _HTTP[500] if error.code >= 500 else _HTTP[400])
    param = error.field if error.field not in (None, "$") else None
    if error.code == 404 and error.field in ("model", "role"):
        code, param = "model_not_found", "model"
    body = {"error": {"message": error.message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": retry_after(status, error)} if status in RETRY_AFTER_S else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return status, body, headers


def retry_after(status: int, error: errors.MagiError) -> str:
    """`Retry-After` in whole seconds (HTTP's unit): the service's own hint when it gave one (a full queue knows
    how fast it drains), rounded up and at least 1, else this status's fixed default."""
    if error.retry_after_s is None:
        return str(RETRY_AFTER_S[status])
    return str(max(1, math.ceil(error.retry_after_s)))


# ---- models --------------------------------------------------------------------------------------

def mission_strategy(model: str) -> str | None:
    """The consensus strategy a mission pseudo-model names, or None for an ordinary model name."""
    if model == MISSION_MODEL:
        return DEFAULT_STRATEGY
    if model.startswith(MISSION_MODEL + ":"):
        strategy = model.split(":", 1)[1]
        if strategy in STRATEGIES:
            return strategy
        raise errors.NotFound(f"unknown model {model!r}; mission strategies: {', '.join(STRATEGIES)}", field="model")
    return None


def pseudo_models() -> list[str]:
    return [MISSION_MODEL, *(f"{MISSION_MODEL}:{s}" for s in STRATEGIES)]


def model_list(models: list, created: int) -> dict:
    """`GET /v1/models` from `magi.infer.models`, then the mission pseudo-models."""
    data = [{"id": m.name, "object": "model", "created": created, "owned_by": "magi", "roles": list(m.roles),
             "n_ctx": m.n_ctx, "backend": m.backend} for m in models]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "magi", "roles": ["mission"]}
             for name in pseudo_models()]
    return {"object": "list", "data": data}


# ---- requests ------------------------------------------------------------------------------------

def text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(content):
        if part.type != "text":
            raise errors.BadRequest(f"content parts of type {part.type!r} are not supported (text only)",
                                    field=f"{where}[{i}].type")
        parts.append(part.text)
    return "".join(parts)


def chat_messages(messages: list[Message]) -> list[ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        if m.role in ("tool", "function"):
            raise errors.BadRequest(f"messages with role {m.role!r} are not supported (no tool calling)",
                                    field=f"messages[{i}].role")
        role = "system" if m.role == "developer" else m.role
        out.append(ChatMessage(role=role, content=text_of(m.content, f"messages[{i}].content")))
    return out


def stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_supported(req: ChatRequest | CompletionRequest) -> None:
    """Refuse, naming the field, what MAGI's engines cannot do (rather than silently ignoring it)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise errors.BadRequest(f"{name} is not supported (only 0)", field=name)
    if req.logprobs not in (None, False, 0):
        raise errors.BadRequest("logprobs are not supported", field="logprobs")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise errors.BadRequest("tool calling is not supported", field="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise errors.BadRequest("only response_format {\"type\": \"text\"} is supported", field="response_format")
    else:
        if req.echo:
            raise errors.BadRequest("echo is not supported", field="echo")
        if req.suffix:
            raise errors.BadRequest("suffix is not supported", field="suffix")
        if req.best_of not in (None, 1):
            raise errors.BadRequest("best_of is not supported", field="best_of")


def max_tokens(req: ChatRequest | CompletionRequest) -> int:
    chosen = getattr(req, "max_completion_tokens", None) or req.max_tokens
    return chosen or DEFAULT_MAX_TOKENS


def generate_request(req: ChatRequest | CompletionRequest, *, index: int, request_id: str, timeout_s: float,
                     messages: list[ChatMessage] | None = None, prompt: str | None = None) -> GenerateRequest:
    """One choice's `magi.infer.generate` (streamed when the client streams), with the gateway's own
    `request_id` for `magi.infer.cancel`. With a `seed`, choice i uses seed + i, so n choices differ and
    each is reproducible. OpenAI's defaults: temperature 1, top_p 1."""
    return GenerateRequest(
        model=req.model, messages=messages, prompt=prompt, max_tokens=max_tokens(req),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, stop=stops(req.stop),
        seed=None if req.seed is None else req.seed + index, timeout_s=timeout_s, stream=req.stream,
        request_id=request_id,
    )


def mission_prompt(messages: list[ChatMessage]) -> str:
    """The last user message is the mission's question; earlier turns ride along as context (oldest
    dropped first when they would not fit)."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    if last < 0:
        raise errors.BadRequest("a mission needs a user message", field="messages")
    question = messages[last].content
    if not question.strip():
        raise errors.BadRequest("the last user message is empty", field=f"messages[{last}].content")
    if len(question) > MAX_MISSION_PROMPT:
        raise errors.BadRequest(f"the question is over {MAX_MISSION_PROMPT} characters", field=f"messages[{last}]")
    lines = [f"{m.role}: {m.content}" for m in messages[:last] if m.content.strip()]
    head, tail = "Earlier in this conversation:\n", "\n\nQuestion: "
    room = MAX_MISSION_PROMPT - len(question) - len(head) - len(tail)
    kept: list[str] = []
    for line in reversed(lines):
        if len(line) + 1 > room:
            break
        kept.insert(0, line)
        room -= len(line) + 1
    return f"{head}{chr(10).join(kept)}{tail}{question}" if kept else question


_mission_decoder = msgspec.json.Decoder(MissionRequest)


def mission_request(prompt: str, strategy: str, options: MissionOptions | None, budget: int | None) -> MissionRequest:
    """A validated `magi.mission.run` (its limits checked here, so a bad one is a 400 before anything runs)."""
    o = options or MissionOptions()
    raw = {"prompt": prompt, "needs_deep_analysis": o.needs_deep_analysis, "variations": o.variations,
           "context_needed": o.context_needed, "consensus": o.consensus or strategy, "deadline_s": o.deadline_s,
           "max_tokens": budget or 0, "deep_max_tokens": o.deep_max_tokens, "variations_mode": o.variations_mode,
           "namespace": o.namespace, "k": o.k, "mission_id": o.mission_id}
    try:
        return _mission_decoder.decode(msgspec.json.encode(raw))
    except msgspec.ValidationError as exc:
        error = errors.translate(exc)
        field = error.field if error.field in (None, "prompt", "max_tokens") else f"magi.{error.field}"
        raise errors.BadRequest(error.message, field=field) from None


# ---- replies -------------------------------------------------------------------------------------

def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(replies: list[GenerateReply]) -> dict:
    prompt = sum(r.usage.prompt_tokens for r in replies)
    completion = sum(r.usage.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_id(kind: str, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def chat_completion(cid: str, model: str, replies: list[GenerateReply]) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": replies[0].model or model,
        "system_fingerprint": None,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                     "finish_reason": finish_reason(r.finish_reason)} for i, r in enumerate(replies)],
        "usage": usage(replies),
    }


def text_completion(cid: str, model: str, replies: list[GenerateReply]) -> dict:
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": replies[0].model or model,
        "system_fingerprint": None,
        "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": finish_reason(r.finish_reason)}
                    for i, r in enumerate(replies)],
        "usage": usage(replies),
    }


def chunk(kind: str, cid: str, created: int, model: str, index: int, *, text: str | None = None,
          role: bool = False, finish: str | None = None, extra: dict | None = None) -> dict:
    """One streamed chunk: `chat.completion.chunk` (a delta) or `text_completion` (a piece of text)."""
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": [choice]}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None, "choices": [choice]}
    if extra:
        body.update(extra)
    return body


def usage_chunk(kind: str, cid: str, created: int, model: str, totals: dict) -> dict:
    """`stream_options.include_usage`: a last chunk with no choices and the request's usage."""
    return {"id": cid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": [], "usage": totals}


def mission_extension(reply: MissionReply) -> dict:
    """The `magi` field of a mission's completion: the consensus record, every clone, the memory it used."""
    return {
        "mission_id": reply.mission_id,
        "consensus": msgspec.to_builtins(reply.consensus),
        "cited": list(reply.consensus.cited),
        "clones": msgspec.to_builtins(reply.clones),
        "context": [{"id": h.id, "score": h.score, "namespace": h.namespace} for h in reply.context],
        "timings": msgspec.to_builtins(reply.timings),
        "trace_id": reply.trace_id,
    }


def mission_usage(reply: MissionReply) -> dict:
    """Tokens the clones wrote (their prompts are not reported by the mission)."""
    completion = sum(c.completion_tokens for c in reply.clones)
    return {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}


def mission_completion(kind: str, cid: str, model: str, reply: MissionReply) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.consensus.answer}, "logprobs": None,
                  "finish_reason": "stop"}
    else:
        choice = {"index": 0, "text": reply.consensus.answer, "logprobs": None, "finish_reason": "stop"}
    return {"id": cid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": None, "choices": [choice],
            "usage": mission_usage(reply), "magi": mission_extension(reply)}


def embeddings(model: str, vectors: list[list[float]], encoding: str, prompt_tokens: int = 0) -> dict:
    """`POST /v1/embeddings`' reply; `base64` is little-endian float32, as OpenAI sends it."""
    def encode(v: list[float]) -> Any:
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if encoding == "base64" else v

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

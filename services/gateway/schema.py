"""OpenAI's request bodies as msgspec Structs: what the gateway accepts (unknown fields are ignored, as
OpenAI-compatible servers do; fields MAGI cannot honour are refused with a 400 naming them)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from protos.consensus import Strategy
from protos.memory import Namespace

MAX_N = 8  # choices per request


class TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class MissionOptions(msgspec.Struct, kw_only=True):
    """The `magi` extension (`extra_body={"magi": {...}}`): a mission's own keys (see `magi.mission.run`)."""

    variations: Annotated[list[str], msgspec.Meta(max_length=32)] = []
    needs_deep_analysis: bool = False
    context_needed: bool = False
    namespace: Namespace = "default"
    k: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    consensus: Strategy | None = None  # overrides the strategy the model name gives
    deadline_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 120.0
    deep_max_tokens: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    variations_mode: Literal["style", "prompt"] = "style"
    mission_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""


Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=4096)]
N = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]


class _Sampling(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    seed: int | None = None
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted for compatibility; MAGI's engines have no such knobs, so only their neutral values pass.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    magi: MissionOptions | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=1024)]
    max_completion_tokens: MaxTokens | None = None
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=32)]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    input: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

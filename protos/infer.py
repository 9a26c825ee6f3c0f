from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from protos.common import Usage

Role = Literal["heavy", "fast", "embed"]


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(msgspec.Struct, kw_only=True):
    """`magi.infer.generate`: give `prompt` or `messages`; pick a model by `model` name or by `role`."""

    model: str = ""
    role: Role | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 128
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.95
    stop: list[str] = []
    seed: int | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 120.0  # generation is aborted after this


class GenerateReply(msgspec.Struct, kw_only=True):
    text: str
    model: str
    node: str
    replica: str
    usage: Usage
    latency_ms: float
    finish_reason: str = ""


class EmbedRequest(msgspec.Struct, kw_only=True):
    """`magi.infer.embed`: one vector per text, from the model with the `embed` role unless named."""

    texts: Annotated[list[str], msgspec.Meta(min_length=1, max_length=256)]
    model: str = ""


class EmbedReply(msgspec.Struct, kw_only=True):
    model: str
    dim: int
    vectors: list[list[float]]
    node: str = ""
    replica: str = ""


class ReplicaInfo(msgspec.Struct, kw_only=True):
    replica: str
    node: str
    state: Literal["starting", "ready", "failed"]
    in_flight: int = 0
    served: int = 0
    tokens_per_s: float = 0.0


class ModelInfo(msgspec.Struct, kw_only=True):
    name: str
    backend: str
    roles: list[str]
    source: str
    n_ctx: int
    threads: int
    replicas: list[ReplicaInfo] = []


class ModelsReply(msgspec.Struct, kw_only=True):
    models: list[ModelInfo]

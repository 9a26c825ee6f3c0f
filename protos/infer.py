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
    # llama.cpp's repeat penalty (vLLM's repetition_penalty): > 1 makes repeating recent tokens less likely.
    # 1.0 (the default) is off, as in llama.cpp's server and OpenAI's API.
    repeat_penalty: Annotated[float, msgspec.Meta(ge=0.5, le=2.0)] = 1.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 120.0  # generation is aborted after this
    # Streaming: tokens go out as `StreamChunk` messages (header `Magi-Stream: chunk`) to `stream_subject`
    # when given, else to the request's own reply inbox; the final message is the `GenerateReply`.
    stream: bool = False
    stream_subject: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_$.-]*$", max_length=256)] = ""
    # A caller-chosen id that `magi.infer.cancel` can name; the service makes one up when empty.
    request_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]*$", max_length=128)] = ""
    # sha256:<hex>: only a model whose replicas load exactly these bytes may answer (404 naming `digest`
    # otherwise); "": any.
    digest: Annotated[str, msgspec.Meta(pattern=r"^(sha256:[0-9a-f]{64})?$")] = ""


class GenerateReply(msgspec.Struct, kw_only=True):
    text: str
    model: str
    node: str
    replica: str
    usage: Usage
    latency_ms: float
    finish_reason: str = ""
    request_id: str = ""
    attempts: int = 1  # 2 when the first replica died mid-generation and another one finished it
    # Milliseconds the replica spent inside its engine for this request (measured in the actor around the engine
    # call; for a batched engine that is from the request's submission to its finish, so a wait for a free batch
    # slot counts: the engine was busy). latency_ms less this is the service's own share (routing, Ray, queue).
    engine_ms: float = 0.0


class StreamChunk(msgspec.Struct, kw_only=True):
    """One piece of a streamed generation; `seq` counts chunks from 0 so a gap or repeat shows."""

    request_id: str
    seq: int
    text: str
    replica: str = ""


class CancelRequest(msgspec.Struct, kw_only=True):
    """`magi.infer.cancel`: stop the generation with this `request_id` (streamed or not)."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class CancelReply(msgspec.Struct, kw_only=True):
    request_id: str
    cancelled: bool  # false: no generation with that id is running here


class EmbedRequest(msgspec.Struct, kw_only=True):
    """`magi.infer.embed`: one vector per text, from the model with the `embed` role unless named."""

    texts: Annotated[list[str], msgspec.Meta(min_length=1, max_length=256)]
    model: str = ""
    digest: Annotated[str, msgspec.Meta(pattern=r"^(sha256:[0-9a-f]{64})?$")] = ""  # as GenerateRequest.digest


class EmbedReply(msgspec.Struct, kw_only=True):
    model: str
    dim: int
    vectors: list[list[float]]
    node: str = ""
    replica: str = ""
    prompt_tokens: int = 0  # the texts' tokens as the model counts them (0 where the backend does not say)
    engine_ms: float = 0.0  # milliseconds the replica spent inside its engine computing these vectors


class ReplicaInfo(msgspec.Struct, kw_only=True):
    replica: str
    node: str
    state: Literal["starting", "ready", "restarting", "failed", "draining"]  # draining: finishing its work, then removed
    in_flight: int = 0
    served: int = 0
    tokens_per_s: float = 0.0
    pid: int = 0  # the replica's process on its node
    restarts: int = 0
    utilisation: float = 0.0  # share of the time since it became ready spent generating
    shards: list[str] = []  # llama.cpp RPC endpoints this replica's layers are spread over
    digest: str = ""  # sha256:<hex> of the model file this replica loaded ("" for a vLLM folder)


class ModelInfo(msgspec.Struct, kw_only=True):
    name: str
    backend: str
    roles: list[str]
    source: str
    n_ctx: int
    threads: int
    replicas: list[ReplicaInfo] = []
    queued: int = 0  # requests waiting for a free replica
    max_batch: int = 1  # requests one replica decodes together (its slots); a replica is free while one is
    digest: str = ""  # sha256:<hex> every replica of the model loads ("" for a vLLM folder)


class ModelsReply(msgspec.Struct, kw_only=True):
    models: list[ModelInfo]

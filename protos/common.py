from __future__ import annotations

import msgspec


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: int
    kind: str
    message: str
    field: str | None = None


class ErrorReply(msgspec.Struct, kw_only=True):
    """Body of every error reply; the same code travels in the `Nats-Service-Error-Code` header."""

    error: ErrorDetail


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Empty(msgspec.Struct, kw_only=True):
    """Request body of endpoints that take no arguments (`{}` or an empty payload)."""

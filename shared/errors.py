"""One typed error hierarchy for every MAGI service and client.

Third-party exceptions are translated in exactly one place, :func:`translate`, so handlers raise
or let propagate whatever their library throws and callers always see one of these types.
"""

from __future__ import annotations

import asyncio
import logging
import re

import msgspec

log = logging.getLogger("magi.errors")


class MagiError(Exception):
    """Base of every error MAGI reports to a caller. ``code`` follows HTTP semantics."""

    code: int = 500
    kind: str = "internal"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        # Set when the service refused for load (a full queue): how long to wait before trying again. It rides
        # in the JSON body, so the caller's `from_reply` rebuilds it and the gateway sends it as `Retry-After`.
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        error = {"code": self.code, "kind": self.kind, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.retry_after_s is not None:
            error["retry_after_s"] = self.retry_after_s
        return {"error": error}


class BadRequest(MagiError):
    code, kind = 400, "bad_request"


class Forbidden(MagiError):
    """The caller's bus identity may not do this (nats-server refused the publish or the credentials)."""

    code, kind = 403, "forbidden"


class NotFound(MagiError):
    code, kind = 404, "not_found"


class PayloadTooLarge(MagiError):
    code, kind = 413, "payload_too_large"


class Unprocessable(MagiError):
    """The request was well formed but cannot be carried out (e.g. every clone failed)."""

    code, kind = 422, "unprocessable"


class Internal(MagiError):
    code, kind = 500, "internal"


class Unavailable(MagiError):
    code, kind = 503, "unavailable"


class DeadlineExceeded(MagiError):
    code, kind = 504, "deadline_exceeded"


class StackError(MagiError):
    """The local stack cannot start or stop (port taken, binary missing, readiness timeout)."""

    code, kind = 500, "stack"


_BY_CODE = {cls.code: cls for cls in (BadRequest, Forbidden, NotFound, PayloadTooLarge, Unprocessable, Unavailable, DeadlineExceeded)}

_AT_PATH = re.compile(r"at `\$(?P<path>[^`]*)`")
_MISSING = re.compile(r"missing required field `(?P<name>[^`]+)`")


def field_of_validation_error(message: str) -> str | None:
    """Turn msgspec's ``... - at `$.a[0].b``` / ``missing required field `x``` into ``a[0].b`` / ``x``."""
    path = ""
    at = _AT_PATH.search(message)
    if at:
        path = at.group("path").lstrip(".")
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group('name')}" if path else missing.group("name")
    return path or None


def from_reply(code: str | int, description: str, body: bytes) -> MagiError:
    """Rebuild the typed error a service replied with (``Nats-Service-Error*`` headers + JSON body)."""
    field, retry_after_s = None, None
    try:
        error = msgspec.json.decode(body).get("error", {})
        field, hint = error.get("field"), error.get("retry_after_s")
        if isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint >= 0:
            retry_after_s = float(hint)
    except (msgspec.DecodeError, AttributeError):
        pass
    cls = _BY_CODE.get(int(code) if str(code).isdigit() else 500, Internal)
    return cls(description, field=field, retry_after_s=retry_after_s)


def _module(exc: BaseException) -> str:
    return type(exc).__module__ or ""


def translate(exc: BaseException) -> MagiError:
    """Map any exception to a :class:`MagiError`. Unknown ones become a generic 500 (logged, never echoed)."""
    if isinstance(exc, MagiError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        return BadRequest(str(exc), field=field_of_validation_error(str(exc)) or "$")
    if isinstance(exc, msgspec.DecodeError):
        return BadRequest(f"malformed JSON: {exc}", field="$")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return DeadlineExceeded("deadline exceeded")
    module = _module(exc)
    name = type(exc).__name__
    if module.startswith("nats"):
        if name == "AuthorizationError" or "Authorization Violation" in str(exc):
            return Forbidden("NATS refused this identity's credentials (see MAGI_NATS_CREDS)")
        if name in ("NoRespondersError",):
            return Unavailable("no service is answering on that subject")
        if name in ("TimeoutError",):
            return DeadlineExceeded("the service did not answer in time")
        return Unavailable("message bus unavailable")
    if module.startswith("psycopg"):  # psycopg 3 and psycopg_pool (memory's PostgreSQL)
        log.warning("storage error", extra={"error_type": name, "error": str(exc)})
        if name == "QueryCanceled":  # statement_timeout or a cancel
            return DeadlineExceeded("the storage query did not finish in time")
        import psycopg  # already loaded: the exception came from it

        if isinstance(exc, psycopg.DataError):  # e.g. a NUL character in text or metadata
            return BadRequest("the storage backend refused a value in the request")
        return Unavailable("storage backend unavailable")  # OperationalError, PoolTimeout, PoolClosed, ...
    if module.startswith("redis"):
        log.warning("storage error", extra={"error_type": name, "error": str(exc)})
        return Unavailable("storage backend unavailable")
    if module.startswith("ray"):
        if name == "GetTimeoutError":
            return DeadlineExceeded("model replica did not answer in time")
        log.warning("ray error", extra={"error_type": name, "error": str(exc)})
        return Unavailable("model replica unavailable")
    if isinstance(exc, (ConnectionError, OSError)):
        return Unavailable("a backend connection failed")
    log.error("unexpected error", exc_info=exc)
    return Internal("internal error")

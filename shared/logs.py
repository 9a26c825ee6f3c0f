"""Structured logging: one JSON object per line, extra fields kept.

A line logged inside a span carries the span's `trace_id` and `span_id`, so a mission's log lines on
every service can be found by the trace id its reply names (and joined to its spans in a tracing UI).
"""

from __future__ import annotations

import logging
import os
import sys

import msgspec
from opentelemetry import trace

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"], entry["span_id"] = f"{span.trace_id:032x}", f"{span.span_id:016x}"
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry, enc_hook=str).decode()


def _not_tls_eof_noise(record: logging.LogRecord) -> bool:
    # asyncio warns each time a TLS connection nats-py holds closes ("returning true from eof_received()
    # has no effect when using ssl"): harmless, and one line per disconnect on a TLS bus.
    return "eof_received() has no effect when using ssl" not in record.getMessage()


def quiet_tls_eof() -> None:
    logging.getLogger("asyncio").addFilter(_not_tls_eof_noise)


def setup_logging(service: str) -> None:
    quiet_tls_eof()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("MAGI_LOG_LEVEL", "INFO").upper())
    logging.getLogger("magi").info("starting", extra={"service": service, "pid": os.getpid()})


class _PlainFormatter(logging.Formatter):
    """`magi: message (key=value, ...)`: a log line a person reads between a command's own output."""

    def format(self, record: logging.LogRecord) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        return f"magi: {record.getMessage()}" + (f" ({extra})" if extra else "")


def setup_cli_logging() -> None:
    """The CLI reports failures itself (as typed errors and exit codes), so the libraries under it speak only
    of errors, unless MAGI_LOG_LEVEL asks for more. A host that configured logging already (a test run
    calling the CLI's main) keeps its configuration."""
    quiet_tls_eof()
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    root.addHandler(handler)
    root.setLevel(os.environ.get("MAGI_LOG_LEVEL", "ERROR").upper())

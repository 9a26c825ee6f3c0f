"""OpenTelemetry tracing across NATS hops.

The W3C `traceparent` travels in NATS message headers, so one mission is one trace across the
orchestrator, inference, memory and consensus services. Spans go to `$MAGI_HOME/traces/<service>.jsonl`
by default, or to an OTLP collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set and the exporter is installed.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import msgspec
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger("magi.telemetry")


class JsonlSpanExporter(SpanExporter):
    """Appends finished spans as JSON lines; cheap, dependency-free, greppable by trace id."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [msgspec.json.encode(_span_record(s)) + b"\n" for s in spans]
        with self._lock, self._path.open("ab") as out:
            out.writelines(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _span_record(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": {k: v for k, v in (span.attributes or {}).items()},
        "status": span.status.status_code.name,
    }


def setup_tracing(service: str, home: Path) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter: SpanExporter = JsonlSpanExporter(home / "traces" / f"{service}.jsonl")
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT set but opentelemetry-exporter-otlp is not installed")
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer("magi")


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context, for an outgoing NATS message."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None) -> context.Context:
    return propagate.extract(headers or {})


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""

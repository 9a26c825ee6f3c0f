"""OpenTelemetry tracing across NATS hops.

The W3C `traceparent` travels in NATS message headers, so one mission is one trace across the
orchestrator, inference, memory and consensus services. Spans go over OTLP/HTTP to a collector when
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; otherwise to
`$MAGI_HOME/traces/<service>.jsonl`, one OTLP-JSON `ExportTraceServiceRequest` per line: the file
format an OpenTelemetry Collector's `otlpjsonfile` receiver ingests, so a trace written offline can be
shipped later unchanged.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from pathlib import Path
from typing import Iterator, Sequence

import msgspec
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger("magi.telemetry")

# OTLP/JSON differs from protobuf's canonical JSON mapping in one respect: trace and span ids are hex,
# not base64 (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding).
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def otlp_json(spans: Sequence[ReadableSpan]) -> dict:
    """`spans` as an OTLP/JSON ExportTraceServiceRequest (lowerCamelCase keys, enums as integers,
    64-bit integers as strings, ids as hex), encoded by OpenTelemetry's own OTLP encoder."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    body = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in body.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                _hex_ids(span)
                for link in span.get("links", []):
                    _hex_ids(link)
    return body


def _hex_ids(obj: dict) -> None:
    for key in _ID_FIELDS:
        if key in obj:
            obj[key] = base64.b64decode(obj[key]).hex()


class JsonlSpanExporter(SpanExporter):
    """Appends each batch of finished spans as one OTLP/JSON line; greppable by trace id, and a
    collector's `otlpjsonfile` receiver (include: [$MAGI_HOME/traces/*.jsonl]) can read it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = msgspec.json.encode(otlp_json(spans)) + b"\n"
        with self._lock, self._path.open("ab") as out:
            out.write(line)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _any_value(value: dict):
    """The Python value of an OTLP/JSON AnyValue."""
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    if "arrayValue" in value:
        return [_any_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def _attributes(items: list[dict]) -> dict:
    return {a["key"]: _any_value(a.get("value", {})) for a in items}


def read_spans(path: Path) -> Iterator[dict]:
    """Every span of an OTLP/JSON lines file, flattened: trace_id, span_id, parent_id, name, service,
    start_ns, end_ns, attributes, status (the status code's OTLP name: UNSET, OK or ERROR)."""
    statuses = {0: "UNSET", 1: "OK", 2: "ERROR"}
    with path.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            for resource_spans in msgspec.json.decode(line).get("resourceSpans", []):
                resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
                for scope_spans in resource_spans.get("scopeSpans", []):
                    for span in scope_spans.get("spans", []):
                        yield {"trace_id": span["traceId"], "span_id": span["spanId"],
                               "parent_id": span.get("parentSpanId") or None, "name": span["name"],
                               "service": resource.get("service.name"),
                               "start_ns": int(span.get("startTimeUnixNano", 0)),
                               "end_ns": int(span.get("endTimeUnixNano", 0)),
                               "attributes": _attributes(span.get("attributes", [])),
                               "status": statuses.get(span.get("status", {}).get("code", 0), "UNSET")}


def _otlp_exporter() -> SpanExporter | None:
    """The OTLP exporter the standard environment asks for, or None when none is configured."""
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    try:
        if protocol == "grpc":  # not a MAGI dependency: only when the operator installed it
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:  # http/protobuf, the specification's default
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("OTLP endpoint set but its exporter is not installed: spans go to the JSONL file",
                    extra={"protocol": protocol or "http/protobuf"})
        return None
    return OTLPSpanExporter()  # endpoint, headers, timeout and certificates from the OTEL_* environment


def setup_tracing(service: str, home: Path) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = _otlp_exporter() or JsonlSpanExporter(home / "traces" / f"{service}.jsonl")
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

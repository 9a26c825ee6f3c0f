"""Spans written offline are OTLP/JSON a collector ingests; log lines inside a span carry its ids."""

import base64
import json
import logging

import pytest
from google.protobuf.json_format import ParseDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from shared import telemetry
from shared.logs import JsonFormatter

pytestmark = pytest.mark.unit

HEX32, HEX16 = set("0123456789abcdef"), set("0123456789abcdef")


@pytest.fixture
def traced(tmp_path):
    """A provider writing to a JSONL file and to memory (the SDK's own spans, to compare with)."""
    path = tmp_path / "traces" / "magi-test.jsonl"
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "magi-test"}))
    provider.add_span_processor(SimpleSpanProcessor(telemetry.JsonlSpanExporter(path)))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider.get_tracer("magi"), path, memory
    provider.shutdown()


def _spans(tracer):
    with tracer.start_as_current_span("mission", kind=SpanKind.SERVER, attributes={"clones": 3, "ok": True}) as root:
        with tracer.start_as_current_span("clone", attributes={"role": "fast", "ms": 1.5, "tags": ["a", "b"]},
                                          links=[Link(root.get_span_context())]) as child:
            child.set_status(Status(StatusCode.ERROR, "replica gone"))
    return root, child


def test_each_line_is_an_export_request_in_otlp_json(traced):
    tracer, path, memory = traced
    root, child = _spans(tracer)
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # one export (one line) per finished span with a simple processor
    bodies = [json.loads(line) for line in lines]
    for body in bodies:
        (resource_spans,) = body["resourceSpans"]
        attrs = {a["key"]: a["value"] for a in resource_spans["resource"]["attributes"]}
        assert attrs["service.name"] == {"stringValue": "magi-test"}
        (scope_spans,) = resource_spans["scopeSpans"]
        assert scope_spans["scope"]["name"] == "magi"
        (span,) = scope_spans["spans"]
        assert len(span["traceId"]) == 32 and set(span["traceId"]) <= HEX32
        assert len(span["spanId"]) == 16 and set(span["spanId"]) <= HEX16
        # 64-bit integers are strings in OTLP/JSON; enums are integers
        assert isinstance(span["startTimeUnixNano"], str) and int(span["endTimeUnixNano"]) >= int(span["startTimeUnixNano"])
        assert isinstance(span["kind"], int)
    clone = bodies[0]["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    mission = bodies[1]["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert clone["name"] == "clone" and mission["name"] == "mission" and mission["kind"] == 2  # SPAN_KIND_SERVER
    assert clone["traceId"] == mission["traceId"] == f"{root.get_span_context().trace_id:032x}"
    assert clone["parentSpanId"] == mission["spanId"] == f"{root.get_span_context().span_id:016x}"
    assert clone["links"][0]["spanId"] == mission["spanId"]
    assert clone["status"] == {"code": 2, "message": "replica gone"}
    values = {a["key"]: a["value"] for a in clone["attributes"]}
    assert values["role"] == {"stringValue": "fast"} and values["ms"] == {"doubleValue": 1.5}
    assert values["tags"] == {"arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}}
    assert {a["key"]: a["value"] for a in mission["attributes"]}["clones"] == {"intValue": "3"}


def test_the_json_decodes_to_the_same_protobuf_otlp_exporters_send(traced):
    tracer, path, memory = traced
    _spans(tracer)
    sent = [encode_spans([s]) for s in memory.get_finished_spans()]
    for line, expected in zip(path.read_text().splitlines(), sent):
        body = json.loads(line)
        for rs in body["resourceSpans"]:  # back to protobuf's own JSON mapping (base64 ids) to parse it
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    for obj in (span, *span.get("links", [])):
                        for key in ("traceId", "spanId", "parentSpanId"):
                            if key in obj:
                                obj[key] = base64.b64encode(bytes.fromhex(obj[key])).decode()
        assert ParseDict(body, ExportTraceServiceRequest()) == expected


def test_read_spans_flattens_the_file(traced):
    tracer, path, _ = traced
    root, child = _spans(tracer)
    spans = {s["name"]: s for s in telemetry.read_spans(path)}
    assert spans["clone"]["parent_id"] == spans["mission"]["span_id"] and spans["mission"]["parent_id"] is None
    assert spans["clone"]["service"] == "magi-test" and spans["clone"]["status"] == "ERROR"
    assert spans["mission"]["attributes"] == {"clones": 3, "ok": True}
    assert spans["clone"]["attributes"]["tags"] == ["a", "b"]
    assert spans["mission"]["trace_id"] == f"{root.get_span_context().trace_id:032x}"


def test_otlp_exporter_only_when_an_endpoint_is_configured(monkeypatch, tmp_path):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    assert telemetry._otlp_exporter() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    exporter = telemetry._otlp_exporter()
    assert type(exporter).__module__ == "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    assert exporter._endpoint == "http://127.0.0.1:1/v1/traces"
    exporter.shutdown()


def test_log_lines_inside_a_span_carry_its_ids(traced):
    tracer, _, _ = traced
    record = logging.LogRecord("magi.test", logging.INFO, __file__, 1, "hello", (), None)
    assert "trace_id" not in json.loads(JsonFormatter().format(record))
    with tracer.start_as_current_span("work") as span:
        entry = json.loads(JsonFormatter().format(record))
    ctx = span.get_span_context()
    assert entry["trace_id"] == f"{ctx.trace_id:032x}" and entry["span_id"] == f"{ctx.span_id:016x}"
    assert entry["msg"] == "hello"

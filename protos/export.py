"""Export a JSON Schema per subject from the msgspec contracts (`just protos`)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from protos import common, consensus, gateway, infer, memory, mission, node, sched

# subject -> (request type, reply type); events have no reply.
SUBJECTS: dict[str, tuple[type, type | None]] = {
    "magi.mission.run": (mission.MissionRequest, mission.MissionReply),
    "magi.mission.submit": (mission.MissionRequest, None),  # JetStream; the result: magi.mission.result.<id>
    "magi.mission.get": (mission.MissionGet, mission.MissionReply),
    "magi.mission.dead.<id>": (mission.DeadLetter, None),
    "magi.mission.events.<id>": (mission.MissionEvent, None),  # core NATS, fire-and-forget
    "magi.infer.generate": (infer.GenerateRequest, infer.GenerateReply),
    "magi.infer.cancel": (infer.CancelRequest, infer.CancelReply),
    "magi.infer.generate.stream": (infer.StreamChunk, None),  # each chunk of a streamed generation
    "magi.infer.embed": (infer.EmbedRequest, infer.EmbedReply),
    "magi.infer.models": (common.Empty, infer.ModelsReply),
    "magi.memory.upsert": (memory.UpsertRequest, memory.UpsertReply),
    "magi.memory.search": (memory.SearchRequest, memory.SearchReply),
    "magi.memory.list": (memory.ListRequest, memory.ListReply),
    "magi.memory.delete": (memory.DeleteRequest, memory.DeleteReply),
    "magi.consensus.decide": (consensus.DecideRequest, consensus.ConsensusRecord),
    "magi.consensus.get": (consensus.GetRequest, consensus.ConsensusRecord),
    "magi.consensus.history": (consensus.HistoryRequest, consensus.HistoryReply),
    "magi.sched.nodes": (common.Empty, node.NodesReply),
    "magi.sched.report": (common.Empty, node.ClusterReport),
    "magi.sched.place": (sched.PlaceRequest, sched.PlaceReply),
    "magi.sched.release": (sched.ReleaseRequest, sched.ReleaseReply),
    "magi.sched.drain": (sched.DrainRequest, sched.DrainReply),
    "magi.sched.rebalance": (sched.RebalanceRequest, sched.RebalanceReply),
    "magi.sched.assignments.<node>": (sched.AssignmentsRequest, sched.AssignmentsReply),
    "magi.node.<node>.heartbeat": (node.Heartbeat, None),
    "magi.node.<node>.info": (common.Empty, node.Heartbeat),
    "magi.node.<node>.logs": (node.LogsRequest, node.LogsReply),
    "magi.node.<node>.models.fetch": (node.ModelFetchRequest, node.ModelFetchReply),
    "magi.gateway.info": (common.Empty, gateway.GatewayInfo),
    "error": (common.ErrorReply, None),
}


def schemas() -> dict[str, str]:
    """File name -> JSON text, one file per subject holding request and reply schemas."""
    out = {}
    for subject, (request, reply) in SUBJECTS.items():
        types = [request] + ([reply] if reply else [])
        (req_schema, *rest), components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
        doc = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": subject,
               "request": req_schema, "$defs": components}
        if rest:
            doc["reply"] = rest[0]
        name = subject.replace("<node>", "NODE").replace("<id>", "ID") + ".json"
        out[name] = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schemas().items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written

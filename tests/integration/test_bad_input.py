"""Bad input on every subject gets a structured error; afterwards every service still answers."""

import json

import pytest
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

pytestmark = pytest.mark.integration

# subject -> (payload with a wrong type, the field the error must name)
WRONG_TYPES = {
    "magi.mission.run": (b'{"prompt": "x", "variations": "not a list"}', "variations"),
    "magi.infer.generate": (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens"),
    "magi.infer.embed": (b'{"texts": [1, 2]}', "texts[0]"),
    "magi.infer.cancel": (b'{"request_id": 12}', "request_id"),
    "magi.infer.models": (b'[]', "$"),
    "magi.memory.upsert": (b'{"documents": [{"text": 5}]}', "documents[0].text"),
    "magi.memory.search": (b'{"text": "x", "k": 0}', "k"),
    "magi.memory.list": (b'{"limit": "many"}', "limit"),
    "magi.memory.delete": (b'{"ids": 5}', "ids"),
    "magi.consensus.decide": (b'{"votes": "x"}', "votes"),
    "magi.consensus.get": (b'{"id": 7}', "id"),
    "magi.consensus.history": (b'{"prompt": "x", "k": "many"}', "k"),
    "magi.sched.nodes": (b'[]', "$"),
    "magi.sched.report": (b'"x"', "$"),
    "magi.sched.place": (b'{"instances": [{"instance_id": "a", "ram_gb": "big"}]}', "instances[0].ram_gb"),
    "magi.sched.release": (b'{"instance_ids": 5}', "instance_ids"),
    "magi.sched.drain": (b'{"node": "no spaces allowed"}', "node"),
    "magi.sched.rebalance": (b'{"budget_s": -1}', "budget_s"),
    "magi.sched.assignments.testnode": (b'{"node": 7}', "node"),
    "magi.node.testnode.models.fetch": (b'{"name": 7}', "name"),
}
MISSING_FIELDS = {
    "magi.mission.run": "prompt",
    "magi.infer.embed": "texts",
    "magi.infer.cancel": "request_id",
    "magi.memory.upsert": "documents",
    "magi.consensus.decide": "votes",
    "magi.consensus.get": "id",
    "magi.sched.place": "instances",
    "magi.sched.release": "instance_ids",
    "magi.sched.drain": "node",
    "magi.sched.assignments.testnode": "node",
    "magi.node.testnode.models.fetch": "name",
}
SERVICES = ["magi-agent", "magi-scheduler", "magi-inference", "magi-memory", "magi-consensus", "magi-orchestrator"]


async def _error(nc, subject: str, payload: bytes) -> tuple[str, dict]:
    msg = await nc.request(subject, payload, timeout=30)
    assert msg.headers and ERROR_CODE_HEADER in msg.headers, f"{subject} accepted {payload!r}"
    body = json.loads(msg.data)
    assert body["error"]["message"] == msg.headers[ERROR_HEADER]
    return msg.headers[ERROR_CODE_HEADER], body["error"]


@pytest.mark.parametrize("subject", sorted(WRONG_TYPES))
async def test_malformed_json(nc, subject):
    code, error = await _error(nc, subject, b'{"prompt": ')
    assert code == "400" and error["field"] == "$"


@pytest.mark.parametrize("subject", sorted(WRONG_TYPES))
async def test_wrong_types_name_the_field(nc, subject):
    payload, field = WRONG_TYPES[subject]
    code, error = await _error(nc, subject, payload)
    assert code == "400" and error["field"] == field


@pytest.mark.parametrize("subject", sorted(MISSING_FIELDS))
async def test_missing_fields_name_the_field(nc, subject):
    code, error = await _error(nc, subject, b"{}")
    assert code == "400" and error["field"] == MISSING_FIELDS[subject]


@pytest.mark.parametrize("subject", sorted(WRONG_TYPES))
async def test_oversized_payload_is_413(nc, subject):
    code, error = await _error(nc, subject, b'{"prompt": "' + b"x" * 300_000 + b'"}')
    assert code == "413"


async def test_unknown_model_is_404(nc):
    code, error = await _error(nc, "magi.infer.generate", b'{"prompt": "hi", "model": "gpt-17"}')
    assert code == "404" and error["field"] == "model"


async def test_stream_subject_must_be_a_plain_subject(nc):
    code, error = await _error(nc, "magi.infer.generate", b'{"prompt": "hi", "stream": true, "stream_subject": "a.>"}')
    assert code == "400" and error["field"] == "stream_subject"


@pytest.mark.parametrize("target", ["$JS.API.STREAM.DELETE.MAGI_MISSIONS", "magi.sched.place", "_MAGI.agent-testnode.x",
                                    "$SYS.REQ.SERVER.PING"])
async def test_output_subjects_may_not_target_magi_or_system_subjects(nc, target):
    stream = json.dumps({"prompt": "hi", "stream": True, "stream_subject": target}).encode()
    code, error = await _error(nc, "magi.infer.generate", stream)
    assert code == "400" and error["field"] == "stream_subject" and "reserved" in error["message"]
    mission = json.dumps({"prompt": "hi", "progress_subject": target}).encode()
    code, error = await _error(nc, "magi.mission.run", mission)
    assert code == "400" and error["field"] == "progress_subject"


async def test_unknown_consensus_record_is_404(nc):
    code, error = await _error(nc, "magi.consensus.get", b'{"id": "consensus:doesnotexist"}')
    assert code == "404" and error["field"] == "id"


async def test_prompt_or_messages_required(nc):
    code, error = await _error(nc, "magi.infer.generate", b'{"max_tokens": 4}')
    assert code == "400" and error["field"] == "prompt"


async def test_explicit_placement_of_an_instance_not_in_the_request(nc):
    code, error = await _error(nc, "magi.sched.place",
                               b'{"instances": [{"instance_id": "a", "ram_gb": 1}], "placement": {"b": "testnode"}}')
    assert code == "400" and error["field"] == "placement"


async def test_draining_an_unknown_node_is_404(nc):
    code, error = await _error(nc, "magi.sched.drain", b'{"node": "no-such-node"}')
    assert code == "404" and error["field"] == "node"


async def test_every_service_still_answers_ping(nc):
    # Runs after the bad-input tests above in file order; each service must still be alive.
    for name in SERVICES:
        reply = await nc.request(f"$SRV.PING.{name}", b"", timeout=5)
        assert json.loads(reply.data)["name"] == name

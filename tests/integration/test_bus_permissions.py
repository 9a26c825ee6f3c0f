"""Least privilege on the bus, enforced by nats-server against the running stack's real services."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from magi import stack
from protos.node import Heartbeat, NodesReply
from protos.sched import AssignmentsReply, DrainReply, DrainRequest, InstanceSpec, PlaceReply, PlaceRequest
from shared import bus
from shared.errors import BadRequest, Forbidden, Unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NODE = "testnode"  # the session stack's agent


class Identity:
    """A connection as one identity that records what nats-server refused it."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.nc = None

    async def open(self, magi_stack, identity: str) -> "Identity":
        refusals = bus.Refusals()

        async def on_error(exc: Exception) -> None:
            self.refused.append(str(exc).lower())
            await refusals.note(exc)

        self.nc = bus.track(await stack.connect_as(magi_stack.home, magi_stack.nats_url, identity, error_cb=on_error),
                            refusals)
        return self

    async def was_refused(self, action: str, subject: str, timeout: float = 2.0) -> bool:
        needle = f'permissions violation for {action} to "{subject}"'.lower()
        for _ in range(int(timeout / 0.05)):
            if any(needle in r for r in self.refused):
                return True
            await asyncio.sleep(0.05)
        return False


@pytest.fixture
async def as_identity(magi_stack):
    opened: list[Identity] = []

    async def open_(identity: str) -> Identity:
        opened.append(await Identity().open(magi_stack, identity))
        return opened[-1]

    yield open_
    for ident in opened:
        await ident.nc.close()


async def test_an_anonymous_client_is_refused(magi_stack):
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(magi_stack.nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                           error_cb=bus.on_error)


async def test_a_wrong_key_is_refused(magi_stack, tmp_path):
    from shared.natsauth import ensure_seed

    ensure_seed(tmp_path, "admin")  # a well-formed seed nats-server was never told about
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(magi_stack.nats_url, nkeys_seed=str(tmp_path / "admin.nk"), connect_timeout=2,
                           max_reconnect_attempts=0, allow_reconnect=False, error_cb=bus.on_error)


async def test_a_client_reads_status_but_may_not_place_or_drain(as_identity):
    client = await as_identity("client")
    nodes = await bus.request(client.nc, "magi.sched.nodes", b"{}", NodesReply, timeout=5)
    assert NODE in {n.name for n in nodes.nodes}
    spec = InstanceSpec(instance_id="evil", ram_gb=0.1, command=["sh", "-c", "id > /tmp/pwned"])
    with pytest.raises(Forbidden, match="magi.sched.place"):
        await bus.request(client.nc, "magi.sched.place", PlaceRequest(instances=[spec]), PlaceReply, timeout=1.5)
    with pytest.raises(Forbidden, match="magi.sched.drain"):
        await bus.request(client.nc, "magi.sched.drain", DrainRequest(node=NODE), DrainReply, timeout=1.5)
    assert await client.was_refused("publish", "magi.sched.place")


async def test_a_client_may_not_answer_assignments_nor_read_service_inboxes(as_identity):
    client = await as_identity("client")
    for subject in (f"magi.sched.assignments.{NODE}", "magi.sched.>", f"_MAGI.agent-{NODE}.>", "magi.node.*.logs.>"):
        await client.nc.subscribe(subject)
        assert await client.was_refused("subscription", subject), subject


async def test_a_client_may_not_forge_heartbeats_or_delete_streams(as_identity):
    client = await as_identity("client")
    forged = msgspec.json.encode(Heartbeat(node=NODE, seq=1, sent_at=0.0, interval_s=60))
    await client.nc.publish(f"magi.node.{NODE}.heartbeat", forged)
    assert await client.was_refused("publish", f"magi.node.{NODE}.heartbeat")
    with pytest.raises(Forbidden):
        await bus.request(client.nc, "$JS.API.STREAM.DELETE.MAGI_MISSIONS", b"", dict, timeout=1.5)


async def test_an_agent_speaks_only_for_its_own_node(as_identity):
    agent = await as_identity(f"agent-{NODE}")
    own = await bus.request(agent.nc, f"magi.sched.assignments.{NODE}", {"node": NODE}, AssignmentsReply, timeout=5)
    assert own.node == NODE
    forged = msgspec.json.encode(Heartbeat(node="othernode", seq=1, sent_at=0.0))
    await agent.nc.publish("magi.node.othernode.heartbeat", forged)
    assert await agent.was_refused("publish", "magi.node.othernode.heartbeat")
    with pytest.raises(Forbidden):
        await bus.request(agent.nc, "magi.sched.assignments.othernode", {"node": "othernode"}, AssignmentsReply,
                          timeout=1.5)
    with pytest.raises(Forbidden):
        await bus.request(agent.nc, "magi.sched.place", PlaceRequest(instances=[InstanceSpec(
            instance_id="x", ram_gb=0.1)]), PlaceReply, timeout=1.5)


async def test_assignments_must_name_the_subjects_node(nc):
    with pytest.raises(BadRequest) as info:
        await bus.request(nc, f"magi.sched.assignments.{NODE}", {"node": "othernode"}, AssignmentsReply, timeout=5)
    assert info.value.field == "node"


async def test_cli_role_client_is_refused_a_drain(magi_stack):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MAGI_NATS_URL": magi_stack.nats_url, "MAGI_HOME": magi_stack.home}
    out = subprocess.run([sys.executable, "-m", "magi.cli", "drain", NODE, "--role", "client"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "may not publish to magi.sched.drain" in out.stderr, out.stderr
    ok = subprocess.run([sys.executable, "-m", "magi.cli", "nodes", "--role", "client"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and NODE in ok.stdout, ok.stderr


async def test_one_connections_refusal_is_not_blamed_on_another_in_the_same_process(as_identity):
    client, admin = await as_identity("client"), await as_identity("admin")
    with pytest.raises(Forbidden):
        await bus.request(client.nc, "magi.sched.unserved", b"{}", NodesReply, timeout=1.5)
    with pytest.raises(Unavailable):  # admin may publish there; nothing answers
        await bus.request(admin.nc, "magi.sched.unserved", b"{}", NodesReply, timeout=1.5)

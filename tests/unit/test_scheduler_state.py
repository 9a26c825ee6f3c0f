"""The scheduler's node registry and report, driven by a hand-turned monotonic clock and an in-memory Redis."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from protos.node import Heartbeat
from services.agent.resources import disk_anchor, labels_from_env, sample
from services.scheduler.health import max_instances
from services.scheduler.state import MAINTENANCE_KEY, NODES_KEY, NodeRegistry

pytestmark = pytest.mark.unit

INTERVAL = 1.0


class FakeRedis:
    """The four calls the registry makes, with redis-py's bytes-in-bytes-out behaviour."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.sets: dict[str, set[bytes]] = {}
        self.closed = False

    async def hset(self, key: str, field: str, value: bytes) -> int:
        self.hashes.setdefault(key, {})[field.encode()] = value
        return 1

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.hashes.get(key, {}))

    async def smembers(self, key: str) -> set[bytes]:
        return set(self.sets.get(key, set()))

    async def aclose(self) -> None:
        self.closed = True


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hb(node: str = "n1", **kw) -> Heartbeat:
    base = dict(node=node, seq=1, sent_at=1_700_000_000.0, ram_total_gb=64.0, ram_used_gb=36.0, ram_percent=56.25)
    base.update(kw)
    return Heartbeat(**base)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def registry(fake, clock) -> NodeRegistry:
    return NodeRegistry(fake, INTERVAL, clock=clock)


async def status(registry: NodeRegistry, name: str = "n1") -> str:
    return {n.name: n.status for n in await registry.nodes()}[name]


async def test_unavailable_after_three_missed_intervals_and_back_on_a_new_heartbeat(registry, clock):
    await registry.record(hb())
    clock.now += 2.9
    assert await status(registry) == "HEALTHY"
    clock.now += 0.2  # 3.1 s of silence: more than 3 x 1 s
    assert await status(registry) == "UNAVAILABLE"
    [state] = await registry.nodes()
    assert state.last_seen_s == pytest.approx(3.1)
    await registry.record(hb(seq=2))
    assert await status(registry) == "HEALTHY"


async def test_agent_degradation_passes_through_and_maintenance_wins(registry, fake, clock):
    await registry.record(hb(health="DEGRADED"))
    assert await status(registry) == "DEGRADED"
    fake.sets[MAINTENANCE_KEY] = {b"n1"}
    assert await status(registry) == "MAINTENANCE"
    clock.now += 100.0  # silent and under maintenance: still maintenance
    assert await status(registry) == "MAINTENANCE"


@pytest.mark.parametrize("skew", [-600.0, 0.0, 600.0])
async def test_agent_clock_skew_changes_nothing(registry, clock, skew):
    await registry.record(hb(sent_at=clock.now + skew))
    clock.now += 2.5
    assert await status(registry) == "HEALTHY"
    clock.now += 1.0
    assert await status(registry) == "UNAVAILABLE"


async def test_heartbeat_is_stored_in_redis_and_nodes_are_sorted(registry, fake):
    for name in ("zeta", "alpha", "mid"):
        await registry.record(hb(name))
    assert [n.name for n in await registry.nodes()] == ["alpha", "mid", "zeta"]
    stored = msgspec.json.decode(fake.hashes[NODES_KEY][b"alpha"], type=Heartbeat)
    assert stored == hb("alpha")


async def test_a_restarted_scheduler_lists_known_nodes_as_unavailable_until_heard(fake, clock):
    fake.hashes[NODES_KEY] = {
        b"old": msgspec.json.encode(hb("old")),
        b"junk": b"{not json",
        b"liar": msgspec.json.encode(hb("someone-else")),
    }
    registry = NodeRegistry(fake, INTERVAL, clock=clock)
    await registry.load()
    [state] = await registry.nodes()
    assert (state.name, state.status, state.last_seen_s) == ("old", "UNAVAILABLE", None)
    await registry.record(hb("old", seq=7))
    assert await status(registry, "old") == "HEALTHY"
    await registry.close()
    assert fake.closed


@pytest.mark.parametrize("labels, expected", [({}, 4), ({"max_instances": "2"}, 2), ({"max_instances": "x"}, 4),
                                              ({"max_instances": "-1"}, 4)])
def test_max_instances_label(labels, expected):
    assert max_instances(hb(labels=labels)) == expected


def test_labels_from_env():
    assert labels_from_env("") == {}
    assert labels_from_env("gpu=orin, max_instances = 3,junk,=x,k=a=b") == {"gpu": "orin", "max_instances": "3", "k": "a=b"}


def test_sample_reads_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGI_NODE_LABELS", "rack=a")
    beat = sample("n1", 5, ["x"], home=tmp_path / "not" / "yet")
    assert (beat.node, beat.seq, beat.instances, beat.labels) == ("n1", 5, ["x"], {"rack": "a"})
    assert beat.cpu_count >= 1 and beat.ram_total_gb > 0 and 0 < beat.ram_used_gb <= beat.ram_total_gb
    assert beat.disk_total_gb > 0 and beat.health in ("HEALTHY", "DEGRADED")
    assert disk_anchor(tmp_path / "not" / "yet") == tmp_path.resolve()
    assert disk_anchor(Path("/")) == Path("/")


@pytest.mark.parametrize("name", ["host.example.org", "a b", "x*", ">", "", "n" * 65])
def test_agent_refuses_node_names_unsafe_in_subjects(name, monkeypatch):
    from services.agent.service import node_name
    from shared.config import Settings
    from shared.errors import BadRequest

    monkeypatch.setattr("socket.gethostname", lambda: "also.bad")  # an empty name falls back to the host name
    with pytest.raises(BadRequest, match="MAGI_NODE_NAME"):
        node_name(Settings(node_name=name))
    assert node_name(Settings(node_name="rpi-1_b")) == "rpi-1_b"

"""The mission worker against a real nats-server (JetStream, the orchestrator's own bus permissions).

The runner here is a stand-in for `Orchestrator.run` so each failure mode can be chosen: a mission that
fails then succeeds, one that is wrong (4xx), one that fails on every attempt, one whose orchestrator
dies on every attempt (a subprocess that exits mid-mission), duplicates and two workers sharing a queue.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from magi import stack
from magi.procs import free_port
from protos.mission import ConsensusSummary, DeadLetter, MissionReply, MissionRequest, Timings
from services.orchestrator.queue import MissionQueue
from services.orchestrator.results import ResultStore
from services.orchestrator.watch import Disruptions
from shared.errors import BadRequest, Unavailable
from shared.telemetry import inject_headers, tracer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bus_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("mission-queue")
    cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=())
    state = asyncio.run(stack.up(cfg))
    try:
        yield home, state.nats_url
    finally:
        stack.down(home)


@pytest.fixture
async def orch(bus_home):
    """A connection as the orchestrator's identity, with a fresh set of mission streams."""
    home, url = bus_home
    admin = await stack.connect_as(home, url, "admin")
    for stream in ("MAGI_MISSIONS", "MAGI_MISSION_RESULTS", "MAGI_MISSIONS_DEAD"):
        try:
            await admin.jetstream().delete_stream(stream)
        except Exception:
            pass
    await admin.close()
    nc = await stack.connect_as(home, url, "orchestrator")
    try:
        yield nc
    finally:
        await nc.close()


def reply_for(mission_id: str) -> MissionReply:
    return MissionReply(mission_id=mission_id, clones=[], context=[], timings=Timings(total_ms=1.0),
                        consensus=ConsensusSummary(id="consensus:x", answer="ok", strategy="medoid", agreement=1.0,
                                                   votes=1))


async def submit(nc, mission_id: str, **headers: str) -> None:
    body = msgspec.json.encode(MissionRequest(prompt="p", mission_id=mission_id))
    await nc.jetstream().publish("magi.mission.submit", body, headers={"Nats-Msg-Id": mission_id, **headers})


async def outcome(nc, mission_id: str, timeout: float = 30.0):
    results, deadline = ResultStore(nc), time.monotonic() + timeout
    while (stored := await results.stored(mission_id)) is None:
        assert time.monotonic() < deadline, f"no result for {mission_id}"
        await asyncio.sleep(0.1)
    return stored


async def started(nc, runner, **options) -> MissionQueue:
    queue = MissionQueue(nc, runner, Disruptions(), **{"ack_wait_s": 1.5, **options})
    await queue.start()
    return queue


async def test_a_failing_mission_is_retried_and_answered_once(orch):
    calls = collections.Counter()

    async def flaky(mission, ctx, mission_id):
        calls[mission_id] += 1
        if calls[mission_id] == 1:
            raise Unavailable("inference restarting")
        return reply_for(mission_id)

    queue = await started(orch, flaky)
    try:
        await submit(orch, "flaky-1")
        await submit(orch, "flaky-1")  # a re-publish within the window: de-duplicated by JetStream
        stored = await outcome(orch, "flaky-1")
        assert not stored.failed and stored.reply().mission_id == "flaky-1"
        await asyncio.sleep(0.5)
        assert calls["flaky-1"] == 2
        info = await orch.jetstream().stream_info("MAGI_MISSION_RESULTS")
        assert info.state.messages == 1
    finally:
        await queue.close()


async def test_a_wrong_mission_fails_at_once_and_a_hopeless_one_is_dead_lettered(orch):
    calls = collections.Counter()

    async def runner(mission, ctx, mission_id):
        calls[mission_id] += 1
        if mission_id == "wrong":
            raise BadRequest("no such model", field="model")
        raise Unavailable("every clone failed: 503")

    queue = await started(orch, runner, max_deliver=2)
    try:
        await submit(orch, "wrong")
        await submit(orch, "hopeless")
        with pytest.raises(BadRequest):
            (await outcome(orch, "wrong")).reply()
        with pytest.raises(Unavailable):
            (await outcome(orch, "hopeless")).reply()
        assert calls == {"wrong": 1, "hopeless": 2}
        dead = await orch.jetstream().get_last_msg("MAGI_MISSIONS_DEAD", "magi.mission.dead.hopeless")
        letter = msgspec.json.decode(dead.data, type=DeadLetter)
        assert letter.attempts == 2 and letter.code == 503 and "every clone failed" in letter.error
        assert msgspec.json.decode(letter.mission, type=MissionRequest).mission_id == "hopeless"
    finally:
        await queue.close()


async def test_two_workers_share_missions_and_never_run_one_twice(orch, bus_home):
    home, url = bus_home
    other = await stack.connect_as(home, url, "orchestrator")
    runs: list[tuple[str, str]] = []

    def runner_named(worker: str):
        async def run(mission, ctx, mission_id):
            runs.append((worker, mission_id))
            await asyncio.sleep(2.0)  # longer than ack_wait: only in_progress beats keep it ours
            return reply_for(mission_id)
        return run

    # Six each: neither can take all twelve, so both must work.
    first = await started(orch, runner_named("a"), concurrency=6)
    second = await started(other, runner_named("b"), concurrency=6)
    try:
        ids = [f"shared-{i}" for i in range(12)]
        for mission_id in ids:
            await submit(orch, mission_id)
        for mission_id in ids:
            await outcome(orch, mission_id)
        assert sorted(m for _, m in runs) == sorted(ids), runs  # each exactly once
        assert {w for w, _ in runs} == {"a", "b"}
    finally:
        await first.close()
        await second.close()
        await other.close()


async def test_the_mission_span_continues_the_publishers_trace(orch):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # as a service's setup_tracing does
        trace.set_tracer_provider(TracerProvider())
    seen: list[str] = []

    async def runner(mission, ctx, mission_id):
        from shared.telemetry import current_trace_id

        seen.append(current_trace_id())
        return reply_for(mission_id)

    queue = await started(orch, runner)
    try:
        with tracer().start_as_current_span("publisher") as span:
            trace_id = f"{span.get_span_context().trace_id:032x}"
            await submit(orch, "traced", **inject_headers())
        await outcome(orch, "traced")
        assert seen == [trace_id]
    finally:
        await queue.close()


CRASHER = """
import asyncio, os, sys
from services.orchestrator.queue import MissionQueue
from services.orchestrator.watch import Disruptions
from magi import stack

async def main():
    nc = await stack.connect_as(sys.argv[1], sys.argv[2], "orchestrator")
    async def crash(mission, ctx, mission_id):
        os._exit(3)  # the orchestrator dies mid-mission, every time
    await MissionQueue(nc, crash, Disruptions(), ack_wait_s=1.0, max_deliver=2).start()
    await asyncio.sleep(30)

asyncio.run(main())
"""


async def test_a_mission_that_kills_its_orchestrator_every_time_is_dead_lettered(orch, bus_home):
    home, url = bus_home
    survivor = await started(orch, lambda *a: asyncio.sleep(3600), max_deliver=2)  # it only hears advisories
    try:
        # Stop the survivor fetching so only the crashers take the mission.
        survivor._task.cancel()
        await asyncio.sleep(1.5)  # its last pull request expires unanswered
        await submit(orch, "poison")
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", CRASHER, str(home), url], cwd=REPO, timeout=60)
            assert done.returncode == 3
        # Orchestrators are pulling again (JetStream notices the exhausted mission when it would redeliver).
        survivor._task = asyncio.create_task(survivor._loop())
        stored = await outcome(orch, "poison", timeout=30)
        with pytest.raises(Exception, match="stopped during each of its 2 attempts"):
            stored.reply()
        dead = await orch.jetstream().get_last_msg("MAGI_MISSIONS_DEAD", "magi.mission.dead.poison")
        assert msgspec.json.decode(dead.data, type=DeadLetter).attempts == 2
    finally:
        await survivor.close()

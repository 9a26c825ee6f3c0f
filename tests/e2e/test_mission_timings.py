"""A real mission's timings add up: stages, engine time inside them, overhead = total - engine."""

import pytest

from magi import demo
from protos.memory import UpsertReply, UpsertRequest
from protos.mission import MissionReply, MissionRequest
from services.orchestrator.timings import stage_overheads
from shared import bus

pytestmark = pytest.mark.e2e


async def test_a_missions_timings_are_consistent(nc):
    await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=demo.documents()), UpsertReply, timeout=60)
    mission = MissionRequest(prompt="Why do clusters need schedulers?", needs_deep_analysis=True,
                             variations=["in one line", "in one word"], context_needed=True, max_tokens=4,
                             consensus="synthesize")
    reply = await bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=180)
    t = reply.timings
    assert reply.context and all(c.ok for c in reply.clones)

    # An engine ran in every stage but planning, and its time lies inside the stage's.
    for stage in ("memory", "clones", "consensus", "remember"):
        wall, engine = getattr(t, f"{stage}_ms"), getattr(t, f"{stage}_engine_ms")
        assert 0.0 < engine <= wall, (stage, t)
    assert all(0.0 < c.engine_ms <= c.latency_ms for c in reply.clones), reply.clones
    assert t.clones_engine_ms in {c.engine_ms for c in reply.clones}  # the clone that finished last
    assert reply.clones and t.clones_ms >= max(c.latency_ms for c in reply.clones)

    engines = t.memory_engine_ms + t.clones_engine_ms + t.consensus_engine_ms + t.remember_engine_ms
    assert t.engine_ms == pytest.approx(engines, abs=0.05) and t.engine_ms <= t.total_ms
    assert t.overhead_ms >= 0.0 and t.overhead_ms == pytest.approx(t.total_ms - t.engine_ms, abs=0.05)

    stages = t.memory_ms + t.plan_ms + t.clones_ms + t.consensus_ms + t.remember_ms
    assert stages <= t.total_ms + 0.05
    assert t.total_ms - stages < max(25.0, 0.05 * t.total_ms), t  # little time outside the stages
    assert sum(stage_overheads(t).values()) == pytest.approx(t.overhead_ms, abs=0.1)

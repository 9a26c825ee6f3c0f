"""A mission's timings: stage walls, engine time on the critical path, overhead = total - engine."""

import asyncio
import time

import pytest

from magi.mission_client import overhead_line
from protos.mission import CloneResult, Timings
from services.consensus import engine_time
from services.orchestrator.timings import MissionClock, critical_engine_ms, stage_overheads, timings_of

pytestmark = pytest.mark.unit

WALL = {"memory": 30.0, "plan": 1.5, "clones": 400.0, "consensus": 90.0, "remember": 25.0}
ENGINE = {"memory": 12.0, "clones": 380.0, "consensus": 70.0, "remember": 11.0}


def test_overhead_is_total_less_the_engine_time_of_every_stage():
    t = timings_of(550.0, WALL, ENGINE)
    assert t.engine_ms == 12.0 + 380.0 + 70.0 + 11.0 == 473.0
    assert t.overhead_ms == 550.0 - 473.0
    assert (t.memory_ms, t.plan_ms, t.clones_ms, t.consensus_ms, t.remember_ms) == (30.0, 1.5, 400.0, 90.0, 25.0)
    assert (t.memory_engine_ms, t.clones_engine_ms, t.consensus_engine_ms, t.remember_engine_ms) == (12.0, 380.0,
                                                                                                     70.0, 11.0)


def test_stage_overheads_add_up_to_the_mission_overhead():
    t = timings_of(550.0, WALL, ENGINE)
    shares = stage_overheads(t)
    assert shares == {"memory": 18.0, "plan": 1.5, "clones": 20.0, "consensus": 20.0, "remember": 14.0,
                      "other": 3.5}
    assert sum(shares.values()) == pytest.approx(t.overhead_ms)


def test_an_engine_time_over_its_stage_wall_counts_only_up_to_the_wall():
    # A reply's own rounding (or another machine's clock) must not push the overhead below zero.
    t = timings_of(100.0, {"clones": 100.0}, {"clones": 100.4})
    assert t.clones_engine_ms == 100.0 and t.engine_ms == 100.0 and t.overhead_ms == 0.0


def test_no_engine_ran_means_all_of_it_is_overhead():
    t = timings_of(12.5, {"clones": 10.0}, {})
    assert t.engine_ms == 0.0 and t.overhead_ms == 12.5


def test_the_clones_engine_time_is_the_last_finished_clones():
    finished = [CloneResult(clone_id="var1", role="fast", engine_ms=300.0),
                CloneResult(clone_id="deep", role="heavy", engine_ms=250.0)]
    # deep finished last: its engine time is on the critical path, not var1's longer one
    assert critical_engine_ms(finished) == 250.0
    assert critical_engine_ms([]) == 0.0


def test_the_clock_times_stages_and_adds_engine_time_reported_for_them():
    clock = MissionClock()
    with clock.stage("clones"):
        time.sleep(0.02)
    clock.spent("clones", 5.0)
    clock.spent("clones", 3.0)
    clock.spent("memory", -1.0)  # a negative report never adds time
    t = clock.timings()
    assert 20.0 <= t.clones_ms <= t.total_ms
    assert t.clones_engine_ms == 8.0 and t.memory_engine_ms == 0.0
    assert t.overhead_ms == pytest.approx(t.total_ms - 8.0, abs=0.02)


def test_the_overhead_line_names_every_stage():
    line = overhead_line(timings_of(550.0, WALL, ENGINE))
    assert line.startswith("overhead 77.0 ms outside the engines' 473 ms (")
    assert "memory 18.0, plan 1.5, clones 20.0, consensus 20.0, remember 14.0, other 3.5" in line


def test_timings_from_an_older_orchestrator_still_decode():
    import msgspec

    t = msgspec.json.decode(b'{"total_ms": 10, "memory_ms": 1, "clones_ms": 5, "consensus_ms": 4}', type=Timings)
    assert t.overhead_ms == 0.0 and t.plan_ms == 0.0


async def test_consensus_engine_time_is_counted_per_decision():
    async def decision(ms: list[float]) -> float:
        with engine_time.counting() as spent:
            for m in ms:
                await asyncio.sleep(0)  # interleave with the other decision
                engine_time.add(m)
        return spent.ms

    # Two decisions at once (each request runs in its own task) keep their own counts.
    a, b = await asyncio.gather(asyncio.create_task(decision([1.0, 2.0])), asyncio.create_task(decision([10.0])))
    assert (a, b) == (3.0, 10.0)
    engine_time.add(5.0)  # outside a decision: counted nowhere, and no error

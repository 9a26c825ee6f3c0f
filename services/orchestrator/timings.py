"""A mission's stopwatch: each stage's wall time and the engine time inside it, turned into `Timings`.

Pure bookkeeping (no I/O), so the arithmetic is unit-tested without any server.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from protos.mission import CloneResult, Timings

STAGES = ("memory", "plan", "clones", "consensus", "remember")


def _round(ms: float) -> float:
    return round(ms, 2)


def critical_engine_ms(finished: list[CloneResult]) -> float:
    """The engine time on the clones' critical path: that of the clone that finished last (`finished` is in
    finishing order). Clones run side by side, so their engine times overlap and do not add up."""
    return finished[-1].engine_ms if finished else 0.0


class MissionClock:
    def __init__(self, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started
        self.wall: dict[str, float] = {}
        self.engine: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage's wall clock; a stage timed twice adds up."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + (time.perf_counter() - t0) * 1000

    def spent(self, name: str, engine_ms: float) -> None:
        """Engine time reported for (part of) a stage."""
        self.engine[name] = self.engine.get(name, 0.0) + max(0.0, engine_ms)

    def timings(self) -> Timings:
        return timings_of((time.perf_counter() - self.started) * 1000, self.wall, self.engine)


def timings_of(total_ms: float, wall: dict[str, float], engine: dict[str, float]) -> Timings:
    """`Timings` from the total, each stage's wall time and each stage's engine time (milliseconds).

    A stage's engine time never exceeds its wall time: clocks on two machines, or a reply's own rounding,
    must not make overhead negative."""
    inside = {name: min(engine.get(name, 0.0), wall.get(name, 0.0)) for name in STAGES}
    engine_ms = sum(inside.values())
    return Timings(
        total_ms=_round(total_ms),
        memory_ms=_round(wall.get("memory", 0.0)), plan_ms=_round(wall.get("plan", 0.0)),
        clones_ms=_round(wall.get("clones", 0.0)), consensus_ms=_round(wall.get("consensus", 0.0)),
        remember_ms=_round(wall.get("remember", 0.0)),
        memory_engine_ms=_round(inside["memory"]), clones_engine_ms=_round(inside["clones"]),
        consensus_engine_ms=_round(inside["consensus"]), remember_engine_ms=_round(inside["remember"]),
        engine_ms=_round(engine_ms), overhead_ms=_round(max(0.0, total_ms - engine_ms)),
    )


def stage_overheads(t: Timings) -> dict[str, float]:
    """Each stage's time outside the engines (its wall time less its engine time), and `other`: the mission's
    time in no stage (events, building the reply). They add up to `t.overhead_ms`."""
    shares = {"memory": t.memory_ms - t.memory_engine_ms, "plan": t.plan_ms,
              "clones": t.clones_ms - t.clones_engine_ms, "consensus": t.consensus_ms - t.consensus_engine_ms,
              "remember": t.remember_ms - t.remember_engine_ms}
    shares["other"] = t.total_ms - (t.memory_ms + t.plan_ms + t.clones_ms + t.consensus_ms + t.remember_ms)
    return {name: round(ms, 2) for name, ms in shares.items()}

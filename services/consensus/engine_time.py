"""Engine time spent for the decision being made: embeddings of the answers, a synthesis's generation and its
embeddings, as the inference service reports them (`engine_ms`), added up (the calls run one after another).

Each request runs in a task of its own (shared.service), so a context variable keeps concurrent decisions'
counts apart without threading a counter through the strategies, the synthesizer and the history.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator


@dataclass
class EngineTime:
    ms: float = 0.0


_current: ContextVar[EngineTime | None] = ContextVar("magi_consensus_engine_time", default=None)


@contextmanager
def counting() -> Iterator[EngineTime]:
    """Count the engine time reported inside this block (in this task and the tasks it starts)."""
    spent = EngineTime()
    token = _current.set(spent)
    try:
        yield spent
    finally:
        _current.reset(token)


def add(engine_ms: float) -> None:
    """Add an engine call's time to the block counting it; outside one, nothing counts it."""
    spent = _current.get()
    if spent is not None:
        spent.ms += engine_ms

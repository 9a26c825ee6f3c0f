"""The load benchmark's clients: a 503 with a retry hint counts as refused, anything else that fails as failed,
and a level stops sending once its time budget is spent."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.load import closed_loop
from shared import errors

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


async def test_refusals_failures_and_completions_are_told_apart():
    async def call(i: int) -> None:
        await asyncio.sleep(0.001)
        if i % 4 == 1:
            raise errors.Unavailable("full", retry_after_s=1.0)
        if i % 4 == 2:
            raise errors.Unavailable("no responders")
        if i % 4 == 3:
            raise errors.DeadlineExceeded("late")

    level = await closed_loop(3, 20, call)
    assert (len(level.done_ms), len(level.refused_ms), level.failed) == (5, 5, 10)
    figures = level.figures("x", "rps")
    assert figures["x.refused"] == 5 and figures["x.failed"] == 10 and figures["x.rps"] > 0
    assert figures["x.p50_ms"] <= figures["x.p99_ms"]


async def test_every_request_is_sent_once_by_whichever_client_is_free():
    seen: list[int] = []

    async def call(i: int) -> None:
        seen.append(i)
        await asyncio.sleep(0.002 if i % 2 else 0.0)

    await closed_loop(4, 50, call)
    assert sorted(seen) == list(range(50))


async def test_a_level_sends_nothing_after_its_budget():
    async def call(i: int) -> None:
        await asyncio.sleep(0.05)

    level = await closed_loop(2, 1000, call, budget_s=0.2)
    assert 4 <= len(level.done_ms) <= 12

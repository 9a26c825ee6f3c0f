"""Nothing accepted is lost: missions through both entry points while each process kind is killed."""

import asyncio

import pytest

from benchmarks.chaos import measure_pause, measure_redelivery, run_chaos
from magi import stack
from magi.procs import free_port

pytestmark = pytest.mark.chaos


@pytest.mark.timeout(900)
def test_every_accepted_mission_answered_once_through_kills(tmp_path):
    outcome = asyncio.run(run_chaos(tmp_path, progress=lambda _m: None))
    assert outcome["missions"] >= 20, outcome
    for problem in ("lost", "failed", "duplicate_results", "duplicate_consensus"):
        assert not outcome[problem], f"{problem}: {outcome[problem]}"


@pytest.mark.timeout(600)
def test_orchestrator_kill_redelivers_within_seconds_and_a_paused_agent_moves_nothing(tmp_path):
    async def scenario() -> tuple[float, int]:
        state = await stack.up(stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(),
                                                 node_name="pause"))
        try:
            return await measure_redelivery(tmp_path, state.nats_url, rounds=1), await measure_pause(tmp_path,
                                                                                                     state.nats_url)
        finally:
            stack.down(tmp_path)

    redelivery, moves = asyncio.run(scenario())
    assert redelivery <= 15.0, f"in-flight missions ran again only {redelivery:.1f} s after the kill"
    assert moves == 0, f"a 2 s pause of the agent changed placements {moves} times"

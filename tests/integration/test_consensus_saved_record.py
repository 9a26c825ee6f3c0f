"""`save_record` returns what `get` reads back, without reading it (decide's reply skips a database round trip)."""

import pytest

from protos.consensus import Synthesis, Vote
from services.consensus.store import ConsensusStore
from services.consensus.strategies import Decision

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(tmp_path):
    store = await ConsensusStore.connect(f"surrealkv://{tmp_path / 'saved.db'}")
    try:
        yield store
    finally:
        await store.close()


VOTES = [Vote(clone_id="a", text="Paris.", role="heavy", model="m", node="n1", latency_ms=12.5),
         Vote(clone_id="b", text="It is Paris.", role="fast", model="m", node="n2", latency_ms=30.0),
         Vote(clone_id="c", text="", role="fast", ok=False, latency_ms=5000.0)]


@pytest.mark.parametrize("synthesis", [None, Synthesis(inputs=["a", "b"], cited=["b"], model="m", citation="model")])
async def test_the_saved_record_equals_the_one_read_back(store, synthesis):
    decision = Decision(answer="Paris is the capital.", winner="a", agreement=0.67, groups=[["a", "b"]],
                        similarity="embedding")
    saved = await store.save_record(decision, VOTES, "synthesize" if synthesis else "medoid", "mission-1",
                                    prompt="Capital of France?", prompt_vector=[1.0, 0.0], synthesis=synthesis)
    read = await store.get(saved.id)
    assert saved == read
    assert saved.created_at and saved.votes == VOTES and saved.synthesis == synthesis


async def test_a_retried_decision_returns_its_new_record(store):
    first = Decision(answer="one", winner="a", agreement=1.0, groups=[["a"]])
    second = Decision(answer="two", winner="b", agreement=1.0, groups=[["b"]])
    await store.save_record(first, VOTES[:1], "medoid", "again")
    saved = await store.save_record(second, VOTES[1:2], "medoid", "again")
    assert saved.answer == "two" and [v.clone_id for v in saved.votes] == ["b"]
    assert saved == await store.get(saved.id)

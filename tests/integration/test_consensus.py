"""Consensus by meaning through the running stack: the embedding model decides what agrees."""

import pytest

from protos.consensus import ConsensusRecord, DecideRequest, GetRequest, Vote
from shared import bus

pytestmark = pytest.mark.integration


async def test_answers_that_agree_in_meaning_but_not_in_words_form_the_majority(nc):
    votes = [Vote(clone_id="a", text="The French capital is Paris."),
             Vote(clone_id="b", text="Schedulers place jobs on nodes with free resources."),
             Vote(clone_id="c", text="Paris is the capital of France.")]
    record = await bus.request(nc, "magi.consensus.decide", DecideRequest(votes=votes, strategy="majority"),
                               ConsensusRecord, timeout=30)
    assert record.similarity == "embedding"
    assert record.groups[0] == ["a", "c"] and record.winner in {"a", "c"}
    assert record.agreement == pytest.approx(2 / 3, abs=1e-3)


async def test_unrelated_answers_each_stand_alone(nc):
    votes = [Vote(clone_id="a", text="Red."), Vote(clone_id="b", text="Blue."),
             Vote(clone_id="c", text="Bread needs flour, water and yeast.")]
    record = await bus.request(nc, "magi.consensus.decide", DecideRequest(votes=votes, strategy="medoid"),
                               ConsensusRecord, timeout=30)
    assert record.similarity == "embedding" and len(record.groups) == 3
    assert record.agreement == pytest.approx(1 / 3, abs=1e-3)


async def test_synthesize_has_the_heavy_model_write_one_answer_from_the_agreeing_votes(nc):
    votes = [Vote(clone_id="deep", text="Schedulers decide which node runs each job so no machine is overloaded."),
             Vote(clone_id="var0", text="The scheduler picks a node for every job so that no single machine is overloaded."),
             Vote(clone_id="var1", text="Bread needs flour, water and yeast."),
             Vote(clone_id="var2", text="", ok=False)]
    request = DecideRequest(votes=votes, strategy="synthesize", prompt="Why do clusters need schedulers?",
                            mission_id="synth-test", max_tokens=96)
    record = await bus.request(nc, "magi.consensus.decide", request, ConsensusRecord, timeout=120)
    s = record.synthesis
    assert s is not None and s.fallback == "", s
    assert s.inputs == ["deep", "var0"] and record.groups[0] == ["deep", "var0"]  # the agreeing pair, not bread
    assert s.model == "smollm2-135m" and s.node and s.citation in {"model", "attributed"}
    assert set(s.cited) <= set(s.inputs)
    assert record.answer.strip() and s.latency_ms > 0  # written by the model (its reply named model and node)
    for clone_id in s.cited:
        assert f"[{clone_id}" in record.answer or s.citation == "model"
    stored = await bus.request(nc, "magi.consensus.get", GetRequest(mission_id="synth-test"), ConsensusRecord,
                               timeout=10)
    assert stored.synthesis == s and stored.answer == record.answer and stored.prompt == request.prompt


async def test_synthesize_with_a_single_answer_keeps_it_and_says_why(nc):
    votes = [Vote(clone_id="only", text="Paris is the capital of France."), Vote(clone_id="x", text="", ok=False)]
    record = await bus.request(nc, "magi.consensus.decide", DecideRequest(votes=votes, strategy="synthesize"),
                               ConsensusRecord, timeout=60)
    assert record.answer == votes[0].text and record.synthesis.fallback == "one answer: nothing to merge"
    assert record.synthesis.cited == ["only"]

"""Consensus by meaning through the running stack: the embedding model decides what agrees."""

import pytest

from protos.consensus import ConsensusRecord, DecideRequest, Vote
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

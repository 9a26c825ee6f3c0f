"""The pure parts of the `synthesize` strategy: which answers go in, and how citations are found."""

import numpy as np
import pytest

from protos.consensus import Vote
from services.consensus.strategies import Decision
from services.consensus.synthesis import attribute, messages, named_ids, pick_inputs, sentences, with_citations

pytestmark = pytest.mark.unit


def _votes(*texts, failed=()):
    return [Vote(clone_id=f"c{i}", text=t, ok=i not in failed) for i, t in enumerate(texts)]


def _decision(groups):
    return Decision(answer="x", winner=groups[0][0], agreement=0.5, groups=groups)


def test_the_winning_group_is_what_gets_merged():
    votes = _votes("a", "b", "c", "d")
    assert [v.clone_id for v in pick_inputs(_decision([["c1", "c3"], ["c0"], ["c2"]]), votes)] == ["c1", "c3"]


def test_with_no_agreement_the_most_central_answers_are_merged_and_outliers_left_out():
    votes = _votes("a", "b", "c", "d", "e", failed={1})
    vectors = np.array([[1, 0.2, 0], [0, 0, 1], [1, 0, 0.1], [0, 1, 0], [0.9, 0.3, 0]], dtype=np.float32)
    decision = _decision([["c0"], ["c2"], ["c3"], ["c4"]])
    assert [v.clone_id for v in pick_inputs(decision, votes, vectors)] == ["c0", "c2", "c4"]  # not c3, the outlier
    assert len(pick_inputs(decision, votes)) == 3  # by words when there are no vectors


def test_copied_layout_and_repeated_sentences_are_dropped():
    from services.consensus.synthesis import tidy

    text = "Answer c0: Jobs need homes. Jobs need homes. Nodes idle otherwise! jobs need homes."
    assert tidy(text, ["c0"]) == "Jobs need homes. Nodes idle otherwise!"


def test_the_prompt_lists_each_answer_under_its_clone_id_and_asks_the_question_last():
    [message] = messages("Why schedulers?", _votes("Load spreads.", "Jobs fit."))
    assert "Answer c0: Load spreads." in message.content and "Answer c1: Jobs fit." in message.content
    assert message.content.index("Why schedulers?") > message.content.index("Answer c1")


def test_ids_the_model_names_are_its_citations_and_the_sources_line_is_dropped():
    body, cited = named_ids("Load spreads [c1]. Jobs fit [c0, c9].\nSources: c1, c2", ["c0", "c1", "c2"])
    assert cited == ["c0", "c1", "c2"] and "Sources" not in body
    assert named_ids("No ids here.", ["c0"]) == ("No ids here.", [])


def test_each_sentence_is_credited_to_the_closest_input_when_close_enough():
    inputs = _votes("alpha", "beta")
    parts = sentences("First point. Second point! Unrelated?")
    vectors = np.array([[1, 0, 0], [0.1, 1, 0], [0, 0, 1]], dtype=np.float32)
    inputs_v = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    credited = attribute(parts, inputs, vectors, inputs_v)
    assert credited == ["c0", "c1", None]
    assert with_citations(parts, credited) == "First point. [c0] Second point! [c1] Unrelated?"


def test_without_vectors_sentences_are_credited_by_shared_words():
    inputs = _votes("the scheduler spreads the load", "a haiku about nodes")
    assert attribute(["The scheduler spreads load."], inputs, None, None) == ["c0"]


def test_the_merged_answer_is_budgeted_like_the_longest_input():
    from services.consensus.synthesis import DEFAULT_MAX_TOKENS, budget

    assert budget(_votes("short", "tiny")) == 64
    assert budget(_votes("x" * 400)) == 150
    assert budget(_votes("x" * 10_000)) <= DEFAULT_MAX_TOKENS

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos.consensus import Vote
from services.consensus.strategies import decide, normalise, similarity
from shared.errors import Unprocessable

pytestmark = pytest.mark.unit


def votes(*texts, failed=()):
    return [Vote(clone_id=f"c{i}", text=t, ok=i not in failed) for i, t in enumerate(texts)]


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  Yes,  it IS! ") == normalise("yes it is") == "yes it is"


def test_similarity_bounds():
    assert similarity("a b c", "c b a") == 1.0
    assert similarity("a b", "c d") == 0.0
    assert similarity("", "") == 1.0


def test_majority_picks_the_largest_group_and_reports_its_share():
    d = decide(votes("Yes.", "no", "yes", "YES!"), "majority")
    assert d.winner == "c0" and d.agreement == 0.75
    assert d.groups == [["c0", "c2", "c3"], ["c1"]]


def test_without_vectors_close_word_sets_group_and_the_decision_says_words():
    d = decide(votes("red apple", "green apple", "red apple pie"), "majority")
    assert d.groups == [["c0", "c2"], ["c1"]] and d.winner == "c0"  # Jaccard 2/3 joins; 1/3 does not
    assert d.agreement == pytest.approx(2 / 3, abs=1e-4) and d.similarity == "words"


def _unit(*rows):
    array = np.array(rows, dtype=float)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_answers_that_agree_in_meaning_group_by_their_vectors():
    # Few shared words, one meaning: the vectors (as an embedding model gives them) decide.
    texts = ("The French capital is Paris.", "Paris is the capital of France.", "It is Lyon.")
    vectors = _unit([1.0, 0.1, 0.0], [0.98, 0.15, 0.02], [0.3, 0.0, 1.0])
    d = decide(votes(*texts), "majority", vectors)
    assert d.groups == [["c0", "c1"], ["c2"]] and d.agreement == pytest.approx(2 / 3, abs=1e-4)
    assert d.similarity == "embedding" and d.winner in {"c0", "c1"}
    assert decide(votes(*texts), "medoid", vectors).winner in {"c0", "c1"}


def test_vectors_of_failed_votes_are_skipped_with_them():
    vectors = _unit([0.0, 1.0], [1.0, 0.0], [1.0, 0.05])
    d = decide(votes("x", "y", "z", failed={0}), "majority", vectors)
    assert d.groups == [["c1", "c2"]] and d.agreement == 1.0


def test_medoid_picks_the_most_central_answer():
    d = decide(votes("the cat sat", "the cat sat down", "dogs bark loudly"), "medoid")
    assert d.winner in {"c0", "c1"} and d.answer in {"the cat sat", "the cat sat down"}
    assert 0 < d.agreement < 1


def test_longest_picks_the_most_detailed_answer():
    d = decide(votes("short", "a much longer answer", "mid size"), "longest")
    assert d.winner == "c1"


def test_failed_and_empty_votes_do_not_count():
    d = decide(votes("right", "wrong", "  ", failed={1}), "majority")
    assert d.winner == "c0" and d.agreement == 1.0


def test_no_successful_vote_is_unprocessable():
    with pytest.raises(Unprocessable) as info:
        decide(votes("a", "b", failed={0, 1}), "medoid")
    assert info.value.field == "votes"


@given(st.lists(st.tuples(st.text(max_size=40), st.booleans()), min_size=1, max_size=8),
       st.sampled_from(["medoid", "majority", "longest"]))
def test_any_decision_is_one_of_the_ok_votes_and_deterministic(items, strategy):
    vs = [Vote(clone_id=f"c{i}", text=t, ok=ok) for i, (t, ok) in enumerate(items)]
    ok = [v for v in vs if v.ok and v.text.strip()]
    if not ok:
        with pytest.raises(Unprocessable):
            decide(vs, strategy)
        return
    d = decide(vs, strategy)
    assert d.winner in {v.clone_id for v in ok}
    assert 0.0 <= d.agreement <= 1.0
    assert decide(vs, strategy) == d

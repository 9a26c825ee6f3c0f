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


def test_majority_tie_is_broken_by_similarity_to_the_rest():
    d = decide(votes("red apple", "green apple", "red apple pie"), "majority")
    assert d.winner == "c0"  # closest to both others
    assert d.agreement == pytest.approx(1 / 3, abs=1e-4)


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

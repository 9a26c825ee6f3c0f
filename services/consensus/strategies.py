"""Consensus strategies: pure functions over votes, deterministic for a given input.

Similarity is by meaning when the caller has the answers' embeddings (unit vectors from the embedding
model; cosine = dot product), else by words (token-set Jaccard), and the decision says which it used.
Answers are grouped greedily, in vote order: an answer joins the first group whose centroid it is at
least `GROUP_THRESHOLD` similar to, else starts its own. With all-MiniLM-L6-v2, 0.85 keeps paraphrases
together ("The French capital is Paris." / "Paris is the capital of France.": 0.98) and one-word
contradictions apart ("Red." / "Blue.": 0.79); longer contradictions that share most words can still
score above it (embeddings do not see negation), so agreement measures closeness of meaning, not truth.

- majority: the largest group wins; its member closest to the group's centroid is the answer.
- medoid: the answer with the highest mean similarity to the largest group's members.
- longest: the longest answer.
`agreement` is always the share of the votes in the winner's group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from protos.consensus import Vote
from shared.errors import Unprocessable

GROUP_THRESHOLD = {"embedding": 0.85, "words": 0.6}
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
    similarity: str = "words"  # "embedding" when the vote vectors decided


def similarity_matrix(votes: list[Vote], vectors: np.ndarray | None) -> tuple[np.ndarray, str]:
    if vectors is not None:
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return unit @ unit.T, "embedding"
    n = len(votes)
    matrix = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = similarity(votes[i].text, votes[j].text)
    return matrix, "words"


def group(sim: np.ndarray, threshold: float) -> list[list[int]]:
    """Greedy grouping in vote order against each group's mean similarity; largest groups first."""
    groups: list[list[int]] = []
    for i in range(len(sim)):
        scores = [float(sim[i, g].mean()) for g in groups]
        best = int(np.argmax(scores)) if scores else -1
        if best >= 0 and scores[best] >= threshold:
            groups[best].append(i)
        else:
            groups.append([i])
    return sorted(groups, key=len, reverse=True)  # stable: equal sizes keep first-seen order


def decide(votes: list[Vote], strategy: str, vectors: np.ndarray | None = None) -> Decision:
    ok_index = [i for i, v in enumerate(votes) if v.ok and v.text.strip()]
    if not ok_index:
        raise Unprocessable("no successful votes to decide from", field="votes")
    ok = [votes[i] for i in ok_index]
    sim, kind = similarity_matrix(ok, None if vectors is None else vectors[ok_index])
    groups = group(sim, GROUP_THRESHOLD[kind])
    largest = groups[0]
    if strategy == "majority":
        winner = max(largest, key=lambda i: (float(sim[i, largest].mean()), -i))
    elif strategy == "longest":
        winner = max(range(len(ok)), key=lambda i: (len(ok[i].text), -i))
    else:
        winner = max(range(len(ok)), key=lambda i: (float(sim[i, largest].mean()), -i))
    own = next(g for g in groups if winner in g)
    return Decision(answer=ok[winner].text, winner=ok[winner].clone_id, agreement=round(len(own) / len(ok), 4),
                    groups=[[ok[i].clone_id for i in g] for g in groups], similarity=kind)

"""`synthesize`: the heavy model writes one answer from the winning group's answers, citing clone ids.

Which answers it reads: the winning group's (the answers that agree in meaning); when no two agree, the
three most central answers (highest mean similarity to all the others), so an outlier is left out.
Each answer is cut to `ANSWER_CHARS` and at most `MAX_INPUTS` are given, so the prompt fits a small
model's context. It decodes greedily with a mild repeat penalty; layout it copies from the prompt
("Answer var0:") and sentences it repeats are dropped.

Citations: when the model names answer ids (`[var0]`, or a `Sources: deep, var0` line) those are the
citations. Small models rarely do, whatever the prompt says (SmolLM2-135M wrote merged answers and
never an id in our trials), so otherwise each sentence of the answer is credited to the input it is
closest to in meaning (`ATTRIBUTE_MIN` cosine, or word overlap when no embedder answers) and the id is
appended to the sentence. `Synthesis.citation` says which.

The medoid stays the answer, with `Synthesis.fallback` saying why, when the heavy model cannot answer
in the time the caller has left (none serving, too long, deadline) or when what it wrote strayed from
its inputs (cosine to the closest input under `STRAY_MIN`): an answer about something else is never
returned, and a mission is never lost to its last step.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from protos.consensus import Synthesis, Vote
from protos.infer import ChatMessage, GenerateReply, GenerateRequest
from services.consensus import engine_time
from services.consensus.strategies import Decision, normalise, similarity, similarity_matrix
from shared import bus
from shared.errors import MagiError

MAX_INPUTS = 6
NO_AGREEMENT_INPUTS = 3
# The written answer's cosine to the closest of its inputs must reach this, else the medoid is kept: a small
# model sometimes answers something else entirely (0.30 seen from a haiku's inputs; good merges 0.85-0.91).
# (Against the inputs' centroid, an on-topic answer scored 0.33 when one input was a garbled haiku.)
STRAY_MIN = 0.5
ANSWER_CHARS = 600
DEFAULT_MAX_TOKENS = 256  # at most; an answer about as long as the longest input is asked for (`budget`)
# Greedy decoding on a small model loops ("a worthy, a worthy, ..." when one input was a bad haiku); a
# mild penalty stopped that in our trials on SmolLM2-135M without garbling the answer (1.15-1.3 tried).
REPEAT_PENALTY = 1.2
DEFAULT_TIMEOUT_S = 60.0
ATTRIBUTE_MIN = {"embedding": 0.5, "words": 0.2}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_BRACKETED = re.compile(r"\[([A-Za-z0-9_, -]+)\]")
_SOURCES = re.compile(r"^\s*sources?\s*:\s*(.*)$", re.IGNORECASE | re.MULTILINE)

Embed = Callable[[list[str]], Awaitable[np.ndarray | None]]


@dataclass(frozen=True)
class Written:
    text: str
    synthesis: Synthesis


def pick_inputs(decision: Decision, votes: list[Vote], vectors: np.ndarray | None = None) -> list[Vote]:
    """The winning group's answers (vote order, at most MAX_INPUTS); when no two agree, the NO_AGREEMENT_INPUTS
    most central answers (highest mean similarity to the rest), so an outlier (a bad haiku) is left out."""
    ok = [v for v in votes if v.ok and v.text.strip()]
    if decision.groups and len(decision.groups[0]) > 1:
        winners = set(decision.groups[0])
        return [v for v in ok if v.clone_id in winners][:MAX_INPUTS]
    sim, _ = similarity_matrix(ok, _rows(vectors, votes, ok))
    central = sorted(range(len(ok)), key=lambda i: (-float(sim[i].mean()), i))[:NO_AGREEMENT_INPUTS]
    return [ok[i] for i in sorted(central)]


def tidy(text: str, ids: list[str]) -> str:
    """Drop what a small model copies from the prompt's layout ("Answer var0:") and sentences it repeats."""
    for clone_id in ids:
        text = re.sub(rf"\bAnswer {re.escape(clone_id)}:\s*", "", text)
    kept, seen = [], set()
    for part in sentences(text):
        key = normalise(part)
        if key and key not in seen:
            seen.add(key)
            kept.append(part)
    return " ".join(kept)


def messages(prompt: str, inputs: list[Vote]) -> list[ChatMessage]:
    # Tried on SmolLM2-135M: a system "editor" role made it drift; one user turn with the answers first and
    # the question last gave short merged answers instead of a copy of the list.
    ids = [v.clone_id for v in inputs]
    listing = "\n\n".join(f"Answer {v.clone_id}: {v.text.strip()[:ANSWER_CHARS]}" for v in inputs)
    question = prompt.strip() or "the question these answers reply to"
    return [ChatMessage(role="user", content=(
        f"{listing}\n\nUsing the answers above, answer in a few sentences: {question}\n"
        f"Finish with 'Sources: ' and the answer ids you used, e.g. Sources: {', '.join(ids[:2])}."))]


def budget(inputs: list[Vote]) -> int:
    """Tokens for the merged answer: about the longest input's length (4 characters a token), within bounds."""
    longest = max((len(v.text.strip()[:ANSWER_CHARS]) for v in inputs), default=0)
    return max(64, min(DEFAULT_MAX_TOKENS, int(longest / 4 * 1.5)))


def named_ids(text: str, ids: list[str]) -> tuple[str, list[str]]:
    """The ids the model itself cites, and its text without the `Sources:` line."""
    found: list[str] = []
    for match in (*_BRACKETED.finditer(text), *_SOURCES.finditer(text)):
        for token in re.split(r"[,\s]+", match.group(1)):
            if token in ids and token not in found:
                found.append(token)
    body = _SOURCES.sub("", text).strip()
    return body, [i for i in ids if i in found]


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s.strip()]


def attribute(parts: list[str], inputs: list[Vote], part_vectors: np.ndarray | None,
              input_vectors: np.ndarray | None) -> list[str | None]:
    """For each sentence, the clone id of the input closest to it in meaning (or words), if close enough."""
    if part_vectors is not None and input_vectors is not None:
        sims, kind = _unit(part_vectors) @ _unit(input_vectors).T, "embedding"
    else:
        sims = np.array([[similarity(p, v.text) for v in inputs] for p in parts]).reshape(len(parts), len(inputs))
        kind = "words"
    best = sims.argmax(axis=1)
    return [inputs[b].clone_id if sims[i, b] >= ATTRIBUTE_MIN[kind] else None for i, b in enumerate(best)]


def with_citations(parts: list[str], credited: list[str | None]) -> str:
    return " ".join(f"{p.rstrip()} [{c}]" if c else p for p, c in zip(parts, credited))


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


class Synthesizer:
    def __init__(self, nc, embed: Embed) -> None:
        self.nc = nc
        self.embed = embed

    async def write(self, prompt: str, decision: Decision, votes: list[Vote], vote_vectors: np.ndarray | None,
                    max_tokens: int, timeout_s: float) -> Written:
        inputs = pick_inputs(decision, votes, vote_vectors)
        ids = [v.clone_id for v in inputs]
        if len(inputs) == 1:
            return self._fallback(decision, ids, "one answer: nothing to merge")
        started = time.perf_counter()
        request = GenerateRequest(role="heavy", messages=messages(prompt, inputs), temperature=0.0, seed=0,
                                  repeat_penalty=REPEAT_PENALTY, max_tokens=max_tokens or budget(inputs),
                                  timeout_s=timeout_s)
        try:
            reply = await bus.request(self.nc, "magi.infer.generate", request, GenerateReply, timeout=timeout_s)
        except MagiError as exc:
            return self._fallback(decision, ids, f"the heavy model did not answer ({exc.code}: {exc.message})")
        engine_time.add(reply.engine_ms)
        body, cited = named_ids(reply.text, ids)
        body = tidy(body, ids)
        if not body:
            return self._fallback(decision, ids, "the heavy model's answer was empty")
        parts = sentences(body)
        input_vectors = _rows(vote_vectors, votes, inputs)
        # One embed call: the whole answer (to check it stayed with its inputs) and each sentence (to credit it).
        vectors = await self.embed([body, *parts]) if input_vectors is not None else None
        if vectors is not None:
            closeness = float((_unit(vectors[:1]) @ _unit(input_vectors).T).max())
            if closeness < STRAY_MIN:
                return self._fallback(decision, ids, f"the written answer strayed from the clones' answers "
                                                     f"(cosine {closeness:.2f} to the closest, under {STRAY_MIN})")
        citation = "model"
        if not cited:
            credited = attribute(parts, inputs, None if vectors is None else vectors[1:], input_vectors)
            body, cited, citation = with_citations(parts, credited), [i for i in ids if i in credited], "attributed"
        return Written(body, Synthesis(inputs=ids, cited=cited, model=reply.model, node=reply.node, citation=citation,
                                       latency_ms=round((time.perf_counter() - started) * 1000, 2)))

    @staticmethod
    def _fallback(decision: Decision, ids: list[str], why: str) -> Written:
        return Written(decision.answer, Synthesis(inputs=ids, cited=[decision.winner], fallback=why))


def _rows(vectors: np.ndarray | None, votes: list[Vote], chosen: list[Vote]) -> np.ndarray | None:
    """The rows of `vectors` (one per vote) that belong to `chosen`."""
    if vectors is None:
        return None
    index = {v.clone_id: i for i, v in enumerate(votes)}
    return vectors[[index[v.clone_id] for v in chosen]]

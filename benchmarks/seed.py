"""Seed 000's "Performance Expectations" table, measured: the same work done locally and through MAGI.

*Local* is the seed's single-machine baseline: one process calling llama-cpp-python, PostgreSQL (through
the memory service's own `MemoryStore`) and the consensus code directly, one call after another, with every
core for the model. *MAGI* is the same work through the running services of a stack started with the
default catalogue, exactly as `magi up` serves it. Rounds alternate local and MAGI, so both see the same
machine state; each row's figure is the mean wall time per operation.

Rows (the seed's four):
- `single`: one generation.
- `parallel10`: ten generations (locally one after another; through MAGI all at once).
- `memory_inference`: a memory search for the question, then a generation with the notes found.
- `full_op`: a mission: memory context, a deep clone and four variations, a consensus (medoid) over their
  answers. Locally the clones run one after another and the consensus code runs in-process; through MAGI
  it is one `magi.mission.run`, which also stores the decision and remembers the answer (more work, not less).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.memory import DATA, upsert_documents
from magi import stack
from magi.procs import free_port
from protos.consensus import Vote
from protos.infer import GenerateReply, GenerateRequest
from protos.memory import SearchHit, SearchReply, SearchRequest
from protos.mission import MissionReply, MissionRequest
from services.consensus.strategies import decide
from services.inference.catalog import EMBED_THREADS, default_catalog, resolve_source
from services.inference.engine import GenerateParams, LlamaCppEngine
from services.memory.store import MemoryStore
from services.orchestrator.plan import context_block, plan_clones
from shared import bus

log = logging.getLogger("magi.bench.seed")

NAMESPACE = "seedbench"
K = 3
MAX_TOKENS = 48
TIMEOUT = 600.0
ROWS = ("single", "parallel10", "memory_inference", "full_op")
# Seed 000's table: local ms, distributed ms, improvement.
SEED = {"single": (500, 450, 1.1), "parallel10": (5000, 500, 10.0), "memory_inference": (1000, 600, 1.7),
        "full_op": (2000, 400, 5.0)}
QUESTIONS = [
    "Which port does the NAS share its backups on?", "How do we restart the inference node safely?",
    "What caused the last power outage in the lab?", "Where are the model weights kept?",
    "How is the VLAN for the cameras set up?", "What should we check when a GPU node overheats?",
    "How do we add a new Raspberry Pi to the cluster?", "Which node runs the database?",
    "How often are the backups verified?", "What is the plan when the router fails?",
]
VARIATIONS = ["in one sentence", "as a checklist", "for a beginner", "with the main risk"]


@dataclass
class _Row:
    local_s: list[float] = field(default_factory=list)
    magi_s: list[float] = field(default_factory=list)


class _Local:
    """The seed's baseline: everything in this process, one call after another."""

    def __init__(self, pg_dsn: str) -> None:
        spec = default_catalog().models[0]
        self.gen = LlamaCppEngine(resolve_source(spec.source), n_ctx=spec.n_ctx, threads=os.cpu_count() or 1)
        embed_spec = next(m for m in default_catalog().models if m.embedding)
        self.emb = LlamaCppEngine(resolve_source(embed_spec.source), n_ctx=embed_spec.n_ctx, threads=EMBED_THREADS,
                                  embedding=True)
        self.pg_dsn = pg_dsn
        self.store: MemoryStore | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self.gen.load)
        await asyncio.to_thread(self.emb.load)
        dim = len(self.emb.embed(["probe"])[0])
        self.store = await MemoryStore.open(self.pg_dsn, dim)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
        self.gen.close()
        self.emb.close()

    def generate(self, prompt: str, temperature: float = 0.0) -> str:
        params = GenerateParams(messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
                                temperature=temperature, seed=0 if temperature == 0 else None)
        return self.gen.generate(params).text

    async def search(self, question: str) -> list[SearchHit]:
        vector = self.emb.embed([question])[0]
        return await self.store.search(namespace=NAMESPACE, k=K, vector=vector, text=question, mode="hybrid")

    async def memory_inference(self, question: str) -> None:
        hits = await self.search(question)
        self.generate(context_block(hits) + question)

    async def full_op(self, mission: MissionRequest) -> None:
        hits = await self.search(mission.prompt)
        tasks = plan_clones(mission, hits)
        answers = [self.generate(t.prompt, temperature=0.7) for t in tasks]  # the orchestrator's temperature
        votes = [Vote(clone_id=t.clone_id, text=a, role=t.role, ok=bool(a.strip())) for t, a in zip(tasks, answers)]
        vectors = np.array(self.emb.embed([v.text if v.text.strip() else " " for v in votes]), dtype=np.float32)
        decide(votes, "medoid", vectors)


class _Magi:
    """The same work through the running services."""

    def __init__(self, nc) -> None:
        self.nc = nc

    async def generate(self, prompt: str, temperature: float = 0.0) -> str:
        request = GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=temperature,
                                  seed=0 if temperature == 0 else None, timeout_s=TIMEOUT)
        return (await bus.request(self.nc, "magi.infer.generate", request, GenerateReply, timeout=TIMEOUT)).text

    async def memory_inference(self, question: str) -> None:
        query = SearchRequest(text=question, k=K, namespace=NAMESPACE)
        reply = await bus.request(self.nc, "magi.memory.search", query, SearchReply, timeout=TIMEOUT)
        await self.generate(context_block(reply.hits) + question)

    async def full_op(self, mission: MissionRequest) -> None:
        await bus.request(self.nc, "magi.mission.run", mission, MissionReply, timeout=TIMEOUT)


def _mission(question: str) -> MissionRequest:
    return MissionRequest(prompt=question, needs_deep_analysis=True, variations=VARIATIONS, context_needed=True,
                          namespace=NAMESPACE, k=K, consensus="medoid", max_tokens=MAX_TOKENS, deadline_s=TIMEOUT)


async def _timed(work) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


# Operations of each row per round: enough that the rows' means settle (a generation's length varies).
PER_ROUND = {"single": 3, "parallel10": 1, "memory_inference": 3, "full_op": 2}


async def _local_round(local: _Local, rows: dict[str, _Row], questions: list[str]) -> None:
    for i in range(PER_ROUND["single"]):
        rows["single"].local_s.append(await _timed(asyncio.to_thread(local.generate, questions[i])))
    rows["parallel10"].local_s.append(await _timed(asyncio.to_thread(lambda: [local.generate(q) for q in questions])))
    for i in range(PER_ROUND["memory_inference"]):
        rows["memory_inference"].local_s.append(await _timed(local.memory_inference(questions[i])))
    for i in range(PER_ROUND["full_op"]):
        rows["full_op"].local_s.append(await _timed(local.full_op(_mission(questions[i]))))


async def _magi_round(magi: _Magi, rows: dict[str, _Row], questions: list[str]) -> None:
    for i in range(PER_ROUND["single"]):
        rows["single"].magi_s.append(await _timed(magi.generate(questions[i])))
    burst = asyncio.gather(*(magi.generate(q) for q in questions))
    rows["parallel10"].magi_s.append(await _timed(burst))
    for i in range(PER_ROUND["memory_inference"]):
        rows["memory_inference"].magi_s.append(await _timed(magi.memory_inference(questions[i])))
    for i in range(PER_ROUND["full_op"]):
        rows["full_op"].magi_s.append(await _timed(magi.full_op(_mission(questions[i]))))


async def _measure(state, rounds: int, progress) -> dict[str, _Row]:
    rows = {name: _Row() for name in ROWS}
    nc = await stack.connect_as(state.home, state.nats_url)
    local = _Local(state.pg_dsn)
    try:
        progress("seed table: memory notes, local engines, one untimed round each")
        await upsert_documents(nc, json.loads(DATA.read_text())["documents"], NAMESPACE)
        await local.open()
        magi = _Magi(nc)
        warm = {name: _Row() for name in ROWS}
        await _local_round(local, warm, QUESTIONS)
        await _magi_round(magi, warm, QUESTIONS)
        for r in range(rounds):
            questions = QUESTIONS[r % len(QUESTIONS):] + QUESTIONS[:r % len(QUESTIONS)]
            progress(f"seed table round {r + 1}/{rounds}: local, then MAGI")
            await _local_round(local, rows, questions)
            await _magi_round(magi, rows, questions)
    finally:
        await local.close()
        await nc.close()
    return rows


def _figures(rows: dict[str, _Row]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, row in rows.items():
        local_ms, magi_ms = 1000 * float(np.mean(row.local_s)), 1000 * float(np.mean(row.magi_s))
        out[f"seed.{name}.local_ms"] = round(local_ms, 1)
        out[f"seed.{name}.magi_ms"] = round(magi_ms, 1)
        out[f"seed.{name}.speedup"] = round(local_ms / magi_ms, 4)
        out[f"seed.{name}.seed_speedup"] = SEED[name][2]
    out["seed.rounds"] = len(rows["parallel10"].local_s)
    out["seed.cores"] = os.cpu_count() or 1
    return out


async def measure_seed_table(progress=lambda _m: None, rounds: int = 6) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="magi-seed-") as tmp:
        home = Path(tmp)
        cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port())
        state = await stack.up(cfg, progress)
        try:
            rows = await _measure(state, rounds, progress)
        finally:
            stack.down(home, progress)
    log.info("seed table", extra={"rows": {k: (v.local_s, v.magi_s) for k, v in rows.items()}})
    return _figures(rows)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure_seed_table(lambda m: print("...", m, flush=True))), indent=2))

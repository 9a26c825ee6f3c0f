"""Model files in the bus's object store: upload, list, fetch into a node cache by digest, replace, remove,
and who may write (a real nats-server with JetStream, MAGI's own permissions)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magi import stack
from shared import modelstore
from shared.errors import NotFound

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _model_file(tmp_path: Path, name: str, size: int = 3 * 2**20) -> tuple[Path, str]:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(os.urandom(size))  # the store keeps bytes: any content does
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_model_goes_in_once_and_comes_out_verified_into_a_cache(nc, tmp_path):
    path, digest = _model_file(tmp_path, "tiny")
    stored = await modelstore.upload(nc.jetstream(), "tiny-a", path)
    assert stored.digest == digest and stored.size == path.stat().st_size and stored.chunks > 1
    assert "tiny-a" in {m.name for m in await modelstore.list_models(nc.jetstream())}

    cache = modelstore.ModelCache(tmp_path / "cache")
    model, cached = await modelstore.fetch(nc.jetstream(), "tiny-a", cache)
    assert model.digest == digest and cached.name == f"{digest.removeprefix('sha256:')}.gguf"
    assert cached.read_bytes() == path.read_bytes()
    inode = cached.stat().st_ino
    _, again = await modelstore.fetch(nc.jetstream(), "tiny-a", cache, digest=digest)
    assert again == cached and again.stat().st_ino == inode  # a cache hit: not downloaded again
    assert not list((tmp_path / "cache").glob(".*.part"))  # no partial download left behind


async def test_a_fetch_for_other_bytes_than_the_store_holds_is_refused(nc, tmp_path):
    path, digest = _model_file(tmp_path, "tiny")
    await modelstore.upload(nc.jetstream(), "tiny-b", path)
    cache = modelstore.ModelCache(tmp_path / "cache")
    with pytest.raises(NotFound) as refused:
        await modelstore.fetch(nc.jetstream(), "tiny-b", cache, digest="sha256:" + "0" * 64)
    assert refused.value.field == "digest" and not cache.files()
    with pytest.raises(NotFound):
        await modelstore.fetch(nc.jetstream(), "no-such-model", cache)


async def test_new_bytes_under_a_name_are_a_new_file_and_a_removed_name_is_gone(nc, tmp_path):
    cache = modelstore.ModelCache(tmp_path / "cache")
    first, first_digest = _model_file(tmp_path, "v1")
    second, second_digest = _model_file(tmp_path, "v2")
    await modelstore.upload(nc.jetstream(), "tiny-c", first)
    _, old = await modelstore.fetch(nc.jetstream(), "tiny-c", cache)
    await modelstore.upload(nc.jetstream(), "tiny-c", second)
    model, new = await modelstore.fetch(nc.jetstream(), "tiny-c", cache)
    assert model.digest == second_digest != first_digest and new != old and new.read_bytes() == second.read_bytes()
    await modelstore.remove(nc.jetstream(), "tiny-c")
    assert "tiny-c" not in {m.name for m in await modelstore.list_models(nc.jetstream())}
    with pytest.raises(NotFound):
        await modelstore.describe(nc.jetstream(), "tiny-c")


async def test_the_cache_evicts_the_least_recently_used_model_it_does_not_need(nc, tmp_path):
    size = 2**20
    names = ["lru-a", "lru-b", "lru-c"]
    digests = {}
    for name in names:
        path, digests[name] = _model_file(tmp_path, name, size)
        await modelstore.upload(nc.jetstream(), name, path)
    cache = modelstore.ModelCache(tmp_path / "cache", max_bytes=int(2.5 * size))
    await modelstore.fetch(nc.jetstream(), "lru-a", cache)
    await modelstore.fetch(nc.jetstream(), "lru-b", cache)
    os.utime(cache.path_for(digests["lru-a"]), (1, 1))  # a used longest ago...
    await modelstore.fetch(nc.jetstream(), "lru-c", cache, keep=frozenset({digests["lru-a"]}))  # ...but in use
    assert {p.name.removesuffix(".gguf") for p in cache.files()} == {
        digests["lru-a"].removeprefix("sha256:"), digests["lru-c"].removeprefix("sha256:")}


async def test_a_client_may_not_write_the_model_store(nc, nats_url, stack_home, tmp_path):
    path, _ = _model_file(tmp_path, "client", 2**16)
    client = await stack.connect_as(stack_home, nats_url, "client")
    try:
        with pytest.raises(Exception):
            await modelstore.upload(client.jetstream(timeout=2), "from-a-client", path)
    finally:
        await client.close()
    assert "from-a-client" not in {m.name for m in await modelstore.list_models(nc.jetstream())}


def test_the_cli_adds_lists_fetches_and_removes(magi_stack, tmp_path):
    path, digest = _model_file(tmp_path, "cli", 2**20)
    env = {**os.environ, "MAGI_HOME": str(magi_stack.home), "MAGI_NATS_URL": magi_stack.nats_url}

    def magi(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "magi.cli", "models", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    added = magi("add", "tiny-cli", str(path), "--store-only", "--json")  # random bytes: no catalogue model
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)[0]["digest"] == digest
    listed = magi("files")
    assert listed.returncode == 0 and "tiny-cli" in listed.stdout
    fetched = magi("fetch", "tiny-cli", "--digest", digest)
    assert fetched.returncode == 0, fetched.stderr
    assert (Path(magi_stack.home) / "models" / f"{digest.removeprefix('sha256:')}.gguf").read_bytes() == path.read_bytes()
    removed = magi("rm", "tiny-cli", "--file")
    assert removed.returncode == 0, removed.stderr
    missing = magi("fetch", "tiny-cli")
    assert missing.returncode != 0 and "tiny-cli" in missing.stderr

"""Same answers everywhere, without servers: the catalogue's digest and `store:` sources, local files hashed once,
a request that names other bytes refused, the node's model room and holdings, and placement by them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import msgspec
import pytest

from protos.infer import EmbedRequest, GenerateRequest
from protos.node import ModelFetchRequest
from protos.sched import InstanceSpec
from services.agent.models import NodeModels
from services.inference.catalog import ModelSpec, resolve_source
from services.inference.pool import ModelPool
from services.inference.replicas import replica_specs
from services.inference.service import _require_digest
from services.inference.weights import local_weights
from services.scheduler.cluster import NodeConfig
from services.scheduler.explain import explain
from services.scheduler.placement import Placer
from services.scheduler.planning import plan
from shared import modelstore
from shared.config import Settings
from shared.errors import BadRequest, NotFound, Unprocessable

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab" * 32


def _file(tmp_path: Path, content: bytes = b"weights") -> tuple[Path, str]:
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    return path, "sha256:" + hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("digest", ["sha256:xyz", "md5:" + "0" * 32, "sha256:" + "AB" * 32, "sha256:" + "a" * 63])
def test_a_catalogue_digest_must_be_sha256_hex(digest):
    with pytest.raises(msgspec.ValidationError, match="digest"):
        msgspec.convert({"name": "m", "digest": digest}, ModelSpec)


def test_a_store_source_names_an_object_and_is_for_llama_cpp():
    spec = msgspec.convert({"name": "m", "source": "store:smol-1", "digest": DIGEST}, ModelSpec)
    assert spec.store_name == "smol-1" and ModelSpec(name="m").store_name == ""
    with pytest.raises(msgspec.ValidationError, match="names no model"):
        msgspec.convert({"name": "m", "source": "store:"}, ModelSpec)
    with pytest.raises(msgspec.ValidationError, match="llama_cpp"):
        msgspec.convert({"name": "m", "source": "store:x", "backend": "vllm"}, ModelSpec)
    with pytest.raises(BadRequest) as refused:
        resolve_source("store:x")  # nothing local to resolve: a node fetches it
    assert refused.value.field == "source"


def test_a_local_file_is_hashed_once_per_content(tmp_path):
    path, digest = _file(tmp_path)
    book = tmp_path / "cache"
    assert modelstore.known_file_digest(path, book) == digest
    # The book is what a restart reads: a planted value shows the file was not hashed again...
    entries = json.loads((book / modelstore.KNOWN_DIGESTS).read_text())
    (book / modelstore.KNOWN_DIGESTS).write_text(json.dumps({k: DIGEST for k in entries}))
    assert modelstore.known_file_digest(path, book) == DIGEST
    # ...and new content (another size and mtime) is hashed afresh, its old entry dropped.
    path.write_bytes(b"other weights")
    os.utime(path, ns=(1, 1))
    fresh = "sha256:" + hashlib.sha256(b"other weights").hexdigest()
    assert modelstore.known_file_digest(path, book) == fresh
    assert list(json.loads((book / modelstore.KNOWN_DIGESTS).read_text()).values()) == [fresh]


def test_a_local_file_with_other_bytes_than_the_catalogue_names_is_refused(tmp_path):
    path, digest = _file(tmp_path)
    ok = local_weights(ModelSpec(name="m", source=str(path), digest=digest), tmp_path / "cache")
    assert (ok.path, ok.digest, ok.size, ok.store) == (str(path), digest, path.stat().st_size, "")
    assert local_weights(ModelSpec(name="m", source=str(path)), tmp_path / "cache").digest == digest
    with pytest.raises(Unprocessable) as refused:
        local_weights(ModelSpec(name="m", source=str(path), digest=DIGEST), tmp_path / "cache")
    assert refused.value.field == "digest" and DIGEST in refused.value.message


def test_a_request_for_other_bytes_is_refused_naming_digest(tmp_path):
    pool = ModelPool(spec=ModelSpec(name="m"), threads=1, source_path="x", digest=DIGEST)
    _require_digest(pool, "")
    _require_digest(pool, DIGEST)
    with pytest.raises(NotFound) as refused:
        _require_digest(pool, "sha256:" + "cd" * 32)
    assert refused.value.field == "digest"
    for bad in ({"digest": "sha256:1"}, {"digest": "SHA256:" + "ab" * 32}):
        with pytest.raises(msgspec.ValidationError, match="digest"):
            msgspec.convert({"prompt": "hi", **bad}, GenerateRequest)
        with pytest.raises(msgspec.ValidationError, match="digest"):
            msgspec.convert({"texts": ["hi"], **bad}, EmbedRequest)
        with pytest.raises(msgspec.ValidationError, match="digest"):
            msgspec.convert({"name": "m", **bad}, ModelFetchRequest)


def test_a_store_replica_tells_the_scheduler_its_digest_and_download(tmp_path):
    path, digest = _file(tmp_path, b"x" * 4096)
    store = ModelPool(spec=ModelSpec(name="m", source="store:m"), threads=1, source_path=str(path), digest=digest,
                      download_bytes=2**30)
    [spec] = replica_specs(store, "m/0")
    assert spec.model_digest == digest and spec.download_gb == 1.0
    local = ModelPool(spec=ModelSpec(name="m", source=str(path)), threads=1, source_path=str(path), digest=digest)
    [spec] = replica_specs(local, "m/0")
    assert spec.model_digest == "" and spec.download_gb == 0.0  # a local file is never downloaded


def _node(name: str, room: float | None, models: list[str] = ()) -> NodeConfig:
    return NodeConfig(name=name, ram_gb=16.0, max_instances=8, models=list(models), model_room_gb=room)


def test_a_node_without_room_for_a_model_it_lacks_is_refused_and_one_holding_it_preferred():
    replica = InstanceSpec(instance_id="r", ram_gb=1.0, model_digest=DIGEST, download_gb=5.0)
    full = plan([_node("a", 1.0), _node("b", 1.0)], [replica])
    assert full.unplaced and "room for 1.0 GB" in full.unplaced["r"]
    assert explain(Placer([_node("a", 1.0)]), replica).binding == "model_disk"
    # b sorts after a, so only its holding the model can win the tie; it holds it, so no room is needed.
    assert plan([_node("a", 50.0), _node("b", 1.0, [DIGEST])], [replica]).placements == {"r": "b"}
    assert plan([_node("a", 50.0), _node("b", 50.0)], [replica]).placements == {"r": "a"}
    unreported = plan([_node("a", None)], [replica])  # an agent that says nothing of its disk is not refused
    assert unreported.placements == {"r": "a"}
    coordinator = InstanceSpec(instance_id="g", ram_gb=0.1, model_size_gb=2.0, model_digest=DIGEST, download_gb=2.0)
    assert plan([_node("a", 50.0), _node("b", 50.0, [DIGEST])], [coordinator]).placements == {"g": "b"}


async def test_a_node_reports_its_models_and_the_room_eviction_can_make(tmp_path):
    settings = Settings(home=str(tmp_path), model_cache_bytes=3 * 2**20)
    models = NodeModels("n", settings)
    kept, spare = "sha256:" + "aa" * 32, "sha256:" + "bb" * 32
    for digest in (kept, spare):
        models.cache.path_for(digest).write_bytes(b"x" * 2**20)
    models.asked[kept] = 1e18  # asked for just now, as far as the keep horizon is concerned
    held, room_gb = models.holdings(models.keep())
    assert held == [kept, spare]
    assert room_gb == pytest.approx(2 / 1024, abs=1e-3)  # the cap less the kept file: the spare one may go

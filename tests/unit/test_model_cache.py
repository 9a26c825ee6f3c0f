"""The node's model cache: files named by digest, least recently used evicted, models in use kept."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from nats.js.api import ObjectInfo

from shared import modelstore
from shared.errors import BadRequest, Unprocessable

pytestmark = pytest.mark.unit


def _put(cache: modelstore.ModelCache, tag: str, size: int, age: int) -> str:
    digest = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
    path = cache.path_for(digest)
    path.write_bytes(b"x" * size)
    os.utime(path, (age, age))
    return digest


def test_room_is_made_by_evicting_the_least_recently_used_first(tmp_path):
    cache = modelstore.ModelCache(tmp_path, max_bytes=300)
    old, mid, new = _put(cache, "old", 100, 10), _put(cache, "mid", 100, 20), _put(cache, "new", 100, 30)
    evicted = cache.make_room(150)
    assert evicted == [cache.path_for(old), cache.path_for(mid)]
    assert cache.lookup(new) is not None and cache.lookup(old) is None


def test_models_in_use_are_kept_and_a_cache_too_full_of_them_refuses(tmp_path):
    cache = modelstore.ModelCache(tmp_path, max_bytes=250)
    a, b = _put(cache, "a", 100, 10), _put(cache, "b", 100, 20)
    with pytest.raises(Unprocessable, match="in use"):
        cache.make_room(100, keep=frozenset({a, b}))
    assert cache.used_bytes() == 200  # nothing deleted for a download that cannot fit anyway
    with pytest.raises(Unprocessable, match="does not fit"):
        cache.make_room(251)
    assert cache.make_room(100, keep=frozenset({b})) == [cache.path_for(a)]


def test_a_hit_counts_as_a_use(tmp_path):
    cache = modelstore.ModelCache(tmp_path, max_bytes=200)
    a, b = _put(cache, "a", 100, 10), _put(cache, "b", 100, 20)
    assert cache.lookup(a) is not None  # now the most recently used
    assert cache.make_room(100) == [cache.path_for(b)]


def test_no_limit_evicts_nothing(tmp_path):
    cache = modelstore.ModelCache(tmp_path, max_bytes=0)
    _put(cache, "a", 100, 10)
    assert cache.make_room(10**12) == []


def test_digests_are_sha256_hex_and_nats_digests_convert():
    raw = hashlib.sha256(b"weights").digest()
    info = ObjectInfo(name="m", bucket=modelstore.BUCKET, nuid="n",
                      digest="SHA-256=" + base64.urlsafe_b64encode(raw).decode())
    assert modelstore._digest_of(info) == "sha256:" + raw.hex()
    for bad in ("md5:abc", "sha256:xyz", "sha256:" + "A" * 64, raw.hex()):
        with pytest.raises(BadRequest):
            modelstore.digest_hex(bad)

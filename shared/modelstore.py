"""Model files on the bus: a JetStream object store holds each model's weights under its name, and a node
keeps verified copies in a local cache named by their digest, evicted least recently used.

Why the object store and not a file server: nats-py chunks an object and checks its SHA-256 on the way in
and out, JetStream replicates it with the stream when NATS is clustered (`MAGI_STREAM_REPLICAS`), and the
bus's credentials and permissions already say who may write (admin) and who may read (agents): there is
no second server to run and secure.

Used by the operator tooling (`magi models`), by a node's agent (`magi.node.<node>.models.fetch`: the file of a
replica placed on that node) and by the inference service (its own copy, for the tokenizer).

Digests are written `sha256:<hex>` (as OCI and Ollama write them); the cache file of a model is
`<cache>/<hex>.gguf`, so two names for the same bytes share one file and a name moved to new bytes is a
new file: a replica loads exactly the digest it was given.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ObjectInfo, ObjectMeta, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError

from shared.errors import BadRequest, NotFound, Unprocessable

log = logging.getLogger("magi.modelstore")

BUCKET = "magi-models"
STREAM = f"OBJ_{BUCKET}"  # the stream nats-py's object store keeps the bucket in
HASH_CHUNK = 1 << 20
# A download pulls this many chunks at a time (4 MiB of nats-py's 128 KiB chunks) and waits at most
# PULL_WAIT_S for each batch: a stalled store fails the fetch rather than hanging it.
PULL_BATCH = 32
PULL_WAIT_S = 30.0


@dataclass(frozen=True)
class StoredModel:
    name: str
    digest: str  # sha256:<hex>
    size: int
    chunks: int
    mtime: str = ""
    description: str = ""


def digest_hex(digest: str) -> str:
    """The hex of a `sha256:<hex>` digest; BadRequest for anything else."""
    kind, _, value = digest.partition(":")
    if kind != "sha256" or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise BadRequest(f"digest {digest!r} is not sha256:<64 hex digits>", field="digest")
    return value


def _digest_of(info: ObjectInfo) -> str:
    """nats-py's `SHA-256=<base64url>` as `sha256:<hex>`."""
    _, _, encoded = (info.digest or "").partition("=")
    return "sha256:" + base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()


def _stored(info: ObjectInfo) -> StoredModel:
    return StoredModel(name=info.name, digest=_digest_of(info), size=info.size or 0, chunks=info.chunks or 0,
                       mtime=info.mtime or "", description=info.description or "")


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file, read in chunks (call it off the event loop)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


async def _bucket(js: JetStreamContext, *, create: bool = False, replicas: int = 1):
    try:
        return await js.object_store(BUCKET)
    except (BucketNotFoundError, NotFoundError):
        if not create:
            raise NotFound("no model has been added yet (magi models add NAME FILE)", field="name") from None
    config = ObjectStoreConfig(bucket=BUCKET, replicas=replicas, description="MAGI model files (magi models add)")
    return await js.create_object_store(BUCKET, config)


async def upload(js: JetStreamContext, name: str, path: Path, *, replicas: int = 1,
                 description: str = "") -> StoredModel:
    """Store the file under `name` (replacing what the name held: its chunks are purged)."""
    if not path.is_file():
        raise NotFound(f"model file {path} does not exist", field="file")
    store = await _bucket(js, create=True, replicas=replicas)
    with open(path, "rb") as f:  # nats-py reads it in chunks on an executor thread
        info = await store.put(name, f, meta=ObjectMeta(name=name, description=description or path.name))
    stored = _stored(info)
    log.info("model stored", extra={"model": name, "digest": stored.digest, "bytes": stored.size})
    return stored


async def _info_in(store, name: str) -> ObjectInfo:
    try:
        return await store.get_info(name)
    except ObjectNotFoundError:
        raise NotFound(f"no model {name!r} in the store", field="name") from None


async def _describe_in(store, name: str) -> StoredModel:
    return _stored(await _info_in(store, name))


async def describe(js: JetStreamContext, name: str) -> StoredModel:
    return await _describe_in(await _bucket(js), name)


async def list_models(js: JetStreamContext) -> list[StoredModel]:
    try:
        store = await _bucket(js)
    except NotFound:
        return []
    try:
        infos = await store.list()
    except NotFoundError:  # an empty bucket
        return []
    return sorted((_stored(i) for i in infos if not i.deleted), key=lambda m: m.name)


async def remove(js: JetStreamContext, name: str) -> None:
    store = await _bucket(js)
    await _describe_in(store, name)  # NotFound for a name the store does not hold
    await store.delete(name)


class ModelCache:
    """A node's verified model files, `<root>/<hex>.gguf`, at most `max_bytes` in all (0: no limit).

    A file's mtime is its last use: a hit touches it, and room for a download is made by deleting the least
    recently used files that are not in `keep` (the models the node's replicas have loaded)."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        return self.root / f"{digest_hex(digest)}.gguf"

    def lookup(self, digest: str) -> Path | None:
        path = self.path_for(digest)
        if not path.is_file():
            return None
        os.utime(path)
        return path

    def files(self) -> list[Path]:
        """Cached model files, least recently used first."""
        return sorted(self.root.glob("*.gguf"), key=lambda p: p.stat().st_mtime)

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def make_room(self, incoming: int, keep: frozenset[str] = frozenset()) -> list[Path]:
        """Delete least recently used files until `incoming` more bytes fit; the files deleted."""
        if not self.max_bytes:
            return []
        if incoming > self.max_bytes:
            raise Unprocessable(f"a {incoming}-byte model does not fit the {self.max_bytes}-byte model cache "
                                "(MAGI_MODEL_CACHE_BYTES)", field="name")
        kept = {self.path_for(d) for d in keep}
        used, evicted = self.used_bytes(), []
        for path in self.files():
            if used + incoming <= self.max_bytes:
                break
            if path in kept:
                continue
            used -= path.stat().st_size
            path.unlink(missing_ok=True)
            evicted.append(path)
        if used + incoming > self.max_bytes:
            raise Unprocessable(f"the model cache holds {used} bytes of models in use; {incoming} more do not fit "
                                f"its {self.max_bytes} bytes (MAGI_MODEL_CACHE_BYTES)", field="name")
        if evicted:
            log.info("model cache evicted", extra={"files": [p.name for p in evicted]})
        return evicted


async def fetch(js: JetStreamContext, name: str, cache: ModelCache, *, digest: str = "",
                keep: frozenset[str] = frozenset()) -> tuple[StoredModel, Path]:
    """The model's file in the cache, downloaded and verified first when it is not there. With `digest`, the
    store must hold exactly those bytes under `name` (NotFound otherwise): a replica loads what it was told."""
    model, path, _ = await fetch_into(js, name, cache, digest=digest, keep=keep)
    return model, path


async def fetch_into(js: JetStreamContext, name: str, cache: ModelCache, *, digest: str = "",
                     keep: frozenset[str] = frozenset()) -> tuple[StoredModel, Path, bool]:
    """`fetch`, also saying whether the file was in the cache already (True: nothing was downloaded)."""
    if digest:
        digest_hex(digest)  # BadRequest naming `digest` before anything is asked of the store
    store = await _bucket(js)
    info = await _info_in(store, name)
    model = _stored(info)
    if digest and model.digest != digest:
        raise NotFound(f"model {name!r} in the store is {model.digest}, not {digest}", field="digest")
    hit = cache.lookup(model.digest)
    if hit is not None:
        return model, hit, True
    cache.make_room(model.size, keep)
    final = cache.path_for(model.digest)
    part = cache.root / f".{final.name}.{uuid.uuid4().hex}.part"
    try:
        with open(part, "wb") as f:
            got, size = await _download(js, info, f)
        # The file must be the digest this call promises: the bytes written are the bytes hashed.
        if got != model.digest or size != model.size:
            raise NotFound(f"model {name!r} changed while it was fetched ({got}, expected {model.digest})",
                           field="name")
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    log.info("model fetched", extra={"model": name, "digest": model.digest, "bytes": model.size})
    return model, final, False


async def _download(js: JetStreamContext, info: ObjectInfo, f) -> tuple[str, int]:
    """The object's chunks written to `f` in order; their `sha256:<hex>` and byte count.

    Through an ephemeral pull consumer without acks, a batch at a time: here that moved 330 MiB/s against
    51 MiB/s for nats-py's `ObjectStore.get()` (an ordered push consumer with flow control), on loopback
    (benchmarks/model_fetch.py). Writing and hashing run off the event loop, one hop per batch."""
    sub = await js.pull_subscribe(f"$O.{BUCKET}.C.{info.nuid}", durable=None, stream=STREAM,
                                  config=ConsumerConfig(ack_policy=AckPolicy.NONE, max_ack_pending=-1))
    h, got, size = hashlib.sha256(), 0, 0
    try:
        while got < (info.chunks or 0):
            msgs = await sub.fetch(min(PULL_BATCH, info.chunks - got), timeout=PULL_WAIT_S)
            size += await asyncio.to_thread(_write_hashed, f, h, [m.data for m in msgs])
            got += len(msgs)
    finally:
        await sub.unsubscribe()
    return "sha256:" + h.hexdigest(), size


def _write_hashed(f, h, pieces: list[bytes]) -> int:
    for piece in pieces:
        f.write(piece)
        h.update(piece)
    return sum(len(p) for p in pieces)


KNOWN_DIGESTS = "digests.json"  # in a cache folder: local files' digests by path, size and mtime


def known_file_digest(path: Path, folder: Path) -> str:
    """`sha256:<hex>` of a local model file, hashed once per content: the result is kept in
    `<folder>/digests.json` under the file's path, size and mtime (ns), so a restart does not rehash a big file
    that has not changed. Blocking: call it off the event loop."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    book = folder / KNOWN_DIGESTS
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = file_digest(path)
    known = {k: v for k, v in (known.items() if isinstance(known, dict) else ()) if not k.startswith(f"{path.resolve()}|")}
    known[key] = digest
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{KNOWN_DIGESTS}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, book)  # atomic: a concurrent reader sees the old book or the new one
    return digest

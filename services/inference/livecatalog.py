"""The model catalogue as cluster state: a JetStream KV bucket with one key per model, its ModelSpec as JSON.

The inference service seeds the bucket from its YAML (or the built-in) catalogue the first time it starts (the
bucket has never held a message), then treats the bucket as the truth and watches it (reconcile.py); the YAML
stays the seed and what `magi validate-config` reads. `magi models add|set|rm|scale` (admin) and the
autoscaler (inference) write it. A change of one model is a compare-and-set on its key, so two writers never
lose each other's edit (`scale +1` twice is +2).

Keys: NATS KV keys allow `[-/_=.A-Za-z0-9]`, model names `[A-Za-z0-9_.:-]`, so `:` is written `=` (no model
name holds `=`, so the mapping goes both ways).
"""

from __future__ import annotations

import logging
import re
from typing import Any, AsyncIterator, Callable

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from services.inference.catalog import Catalog, ModelSpec
from shared.errors import BadRequest, NotFound, Unavailable, field_of_validation_error

log = logging.getLogger("magi.inference.livecatalog")

BUCKET = "magi-catalog"
STREAM = f"KV_{BUCKET}"  # the stream JetStream keeps the bucket in
CAS_ATTEMPTS = 10  # compare-and-set retries when another writer changed the key in between
READ_ONLY = ("name",)
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")  # settings `set` may not change (a new name is a new model: add it)


def key_of(name: str) -> str:
    key = name.replace(":", "=")
    if key.startswith(".") or key.endswith(".") or ".." in key:
        raise BadRequest(f"model name {name!r} cannot be a catalogue key (no leading, trailing or double '.')",
                         field="name")
    return key


def name_of(key: str) -> str:
    return key.replace("=", ":")


def encode(spec: ModelSpec) -> bytes:
    return msgspec.json.encode(spec)


def decode(data: bytes) -> ModelSpec:
    return msgspec.json.decode(data, type=ModelSpec)


def validated(raw: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from plain values; BadRequest naming the field for anything it refuses."""
    try:
        return msgspec.convert(raw, ModelSpec)
    except msgspec.ValidationError as exc:
        message = str(exc) if str(exc).startswith("model ") else f"model {raw.get('name', '?')}: {exc}"
        raise BadRequest(message, field=_field(str(exc))) from None


def _field(message: str) -> str | None:
    """The setting a validation message is about; an unknown one by its own name (`autoscale.bogus`)."""
    path = field_of_validation_error(message)
    unknown = _UNKNOWN.search(message)
    if unknown:
        return f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    return path


async def open_bucket(js: JetStreamContext, *, create: bool = False, replicas: int = 1) -> KeyValue:
    try:
        return await js.key_value(BUCKET)
    except (BucketNotFoundError, NotFoundError):
        if not create:
            raise NotFound("the model catalogue bucket does not exist yet (the inference service creates it on its "
                           "first start)", field="name") from None
    config = KeyValueConfig(bucket=BUCKET, history=5, replicas=replicas,
                            description="MAGI model catalogue (magi models add|set|rm|scale)")
    return await js.create_key_value(config)


async def never_written(kv: KeyValue) -> bool:
    """True for a bucket nothing was ever put in. A bucket whose models were all removed is not: the operator
    removed them, and they stay removed."""
    return not (await kv.status()).stream_info.state.last_seq


async def seed(kv: KeyValue, catalog: Catalog) -> None:
    """Write `catalog` into the bucket; a model some other writer put there first is left as it is."""
    for spec in catalog.models:
        try:
            await kv.create(key_of(spec.name), encode(spec))
        except KeyWrongLastSequenceError:  # another inference service seeded it at the same moment
            pass
    log.info("model catalogue seeded", extra={"models": [m.name for m in catalog.models]})


async def load(kv: KeyValue) -> dict[str, ModelSpec]:
    """Every model the bucket holds now (one that does not decode is logged and left out)."""
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    specs = {}
    for key in keys:
        try:
            specs[name_of(key)] = decode((await kv.get(key)).value)
        except KeyNotFoundError:  # removed since keys() answered
            continue
        except msgspec.ValidationError as exc:
            log.error("catalogue entry does not decode; ignored", extra={"key": key, "error": str(exc)})
    return specs


async def read(kv: KeyValue, name: str) -> tuple[ModelSpec, int]:
    """A model's spec and the revision it was read at."""
    try:
        entry = await kv.get(key_of(name))
    except KeyNotFoundError:
        raise NotFound(f"no model {name!r} in the catalogue", field="name") from None
    return decode(entry.value), entry.revision


async def put(kv: KeyValue, spec: ModelSpec) -> int:
    return await kv.put(key_of(spec.name), encode(spec))


async def remove(kv: KeyValue, name: str) -> ModelSpec:
    spec, revision = await read(kv, name)
    await kv.delete(key_of(name), last=revision)
    return spec


async def change(kv: KeyValue, name: str, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> ModelSpec:
    """Apply `edit` to the model's settings (plain values) and write the result if it validates, as a
    compare-and-set: when another writer got in between, read again and edit again."""
    for _ in range(CAS_ATTEMPTS):
        spec, revision = await read(kv, name)
        raw = edit(msgspec.to_builtins(spec))
        if any(raw.get(k) != getattr(spec, k) for k in READ_ONLY):
            raise BadRequest(f"model {name}: the name cannot be changed (add the model under the new name)",
                             field="name")
        new = validated(raw)
        if new == spec:
            return spec
        try:
            await kv.update(key_of(name), encode(new), last=revision)
            return new
        except KeyWrongLastSequenceError:
            continue
    raise Unavailable(f"model {name} kept changing under {CAS_ATTEMPTS} attempts to edit it; try again", field="name")


async def watch(kv: KeyValue) -> AsyncIterator[tuple[str, ModelSpec | None]]:
    """Each model as the bucket holds it now, then every change as it happens: (name, spec), or (name, None)
    for a model removed. Entries that do not decode are logged and skipped."""
    watcher = await kv.watchall()
    try:
        async for entry in watcher:
            if entry is None:  # the marker after the current values
                continue
            name = name_of(entry.key)
            if entry.operation in (KV_DEL, KV_PURGE):
                yield name, None
                continue
            try:
                yield name, decode(entry.value)
            except msgspec.ValidationError as exc:
                log.error("catalogue entry does not decode; ignored", extra={"model": name, "error": str(exc)})
    finally:
        await watcher.stop()

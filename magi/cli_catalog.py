"""`magi models add|set|scale|rm|catalog`: the model catalogue on the bus (JetStream KV, written as admin).

The inference service applies every change without a restart (services/inference/reconcile.py): `add`
registers an uploaded file as a model (source `store:NAME`, the uploaded digest), `set NAME key=value ...`
changes settings (checked like the YAML catalogue: a bad value is refused naming its field), `scale NAME
N|+N|-N` sets the replica count, `rm NAME` removes the model (its in-flight requests finish first) and with
`--file` its stored file too, `catalog` lists what the bucket holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from magi.table import render
from services.inference import livecatalog
from services.inference.catalog import STORE_PREFIX, ModelSpec
from shared import modelstore
from shared.errors import BadRequest, NotFound

_DEFAULTS = ModelSpec(name="defaults")
SETTINGS = frozenset(ModelSpec.__struct_fields__) - {"name"}
NESTED = frozenset({"autoscale"})  # settings that are structs: set whole, or one field as `autoscale.max_replicas=3`
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64  # checks an `add`'s settings before its file is uploaded


@dataclass(frozen=True)
class Options:
    """The catalogue options of `magi models` (cli.py parses them)."""

    roles: str = ""  # add: comma-separated
    replicas: int | None = None  # add
    settings: list[str] = field(default_factory=list)  # add: --set KEY=VALUE, repeated
    store_only: bool = False  # add: upload the file, register nothing
    with_file: bool = False  # rm: delete the stored file too


def _value(key: str, text: str) -> Any:
    """A setting's value from the command line: text for text settings, comma lists for list settings, YAML
    scalars (numbers, true/false, null) for the rest; `autoscale=on|off` turns the autoscaler on (defaults)
    or off."""
    default = getattr(_DEFAULTS, key, None)
    if isinstance(default, str):
        return text
    if isinstance(default, list):
        return [yaml.safe_load(item) for item in text.split(",") if item.strip()]
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        raise BadRequest(f"{key}={text!r} is not a value", field=key) from None
    if key == "autoscale" and isinstance(value, bool):
        return {} if value else None
    return value


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as settings; `autoscale.min_replicas=2` sets one field of a nested setting."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        root, _, sub = key.partition(".")
        if not sep or not key:
            raise BadRequest(f"{pair!r} is not key=value", field="settings")
        if root == "name":
            raise BadRequest("the name cannot be changed (add the model under the new name)", field="name")
        if root not in SETTINGS:
            raise BadRequest(f"unknown setting {root!r}; settings: {', '.join(sorted(SETTINGS))}", field=root)
        if sub:
            nested = out.setdefault(root, {})
            if not isinstance(nested, dict):
                raise BadRequest(f"{root} is set whole and by field at once", field=root)
            nested[sub] = yaml.safe_load(text) if text != "" else None
        else:
            out[root] = _value(root, text)
    return out


def with_settings(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`raw` (a spec as plain values) with `changes` applied; a nested change merges into what is set."""
    merged = dict(raw)
    for key, value in changes.items():
        if isinstance(value, dict) and key in NESTED:
            merged[key] = {**(merged.get(key) or {}), **value}
        else:
            merged[key] = value
    return merged


def _new_spec(name: str, digest: str, options: Options) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": name, "source": f"{STORE_PREFIX}{name}", "digest": digest}
    if options.roles:
        raw["roles"] = [r.strip() for r in options.roles.split(",") if r.strip()]
    if options.replicas is not None:
        raw["replicas"] = options.replicas
    return with_settings(raw, parse_settings(options.settings))


def check_add(name: str, options: Options) -> None:
    """Refuse bad `add` settings before anything is uploaded."""
    livecatalog.key_of(name)
    livecatalog.validated(_new_spec(name, PLACEHOLDER_DIGEST, options))


async def _bucket(nc, settings):
    return await livecatalog.open_bucket(nc.jetstream(), create=True, replicas=settings.stream_replicas)


async def register(nc, settings, stored: modelstore.StoredModel, options: Options) -> ModelSpec:
    """The uploaded file as a catalogue model: new, or an existing model moved to these bytes (its replicas are
    then replaced one at a time) with any settings given."""
    kv = await _bucket(nc, settings)
    wanted = _new_spec(stored.name, stored.digest, options)
    try:
        await livecatalog.read(kv, stored.name)
    except NotFound:
        spec = livecatalog.validated(wanted)
        await kv.create(livecatalog.key_of(spec.name), livecatalog.encode(spec))
        return spec
    return await livecatalog.change(kv, stored.name, lambda raw: with_settings(raw, {
        k: v for k, v in wanted.items() if k in ("source", "digest") or k in _given(options)}))


def _given(options: Options) -> set[str]:
    keys = set(parse_settings(options.settings))
    return keys | ({"roles"} if options.roles else set()) | ({"replicas"} if options.replicas is not None else set())


async def set_settings(nc, settings, name: str, pairs: list[str]) -> ModelSpec:
    if not pairs:
        raise BadRequest("magi models set: usage: magi models set NAME KEY=VALUE ...", field="args")
    changes = parse_settings(pairs)
    return await livecatalog.change(await _bucket(nc, settings), name, lambda raw: with_settings(raw, changes))


def scaled(current: int, how: str) -> int:
    """`N`, `+N` or `-N` applied to the current replica count."""
    try:
        n = int(how)
    except ValueError:
        raise BadRequest(f"replicas {how!r}: give N, +N or -N", field="replicas") from None
    return current + n if how[:1] in "+-" else n


async def scale(nc, settings, name: str, how: str) -> ModelSpec:
    scaled(1, how)  # a malformed count is refused before anything is read
    return await livecatalog.change(await _bucket(nc, settings), name,
                                    lambda raw: {**raw, "replicas": scaled(raw["replicas"], how)})


async def remove(nc, settings, name: str, options: Options) -> list:
    """The catalogue entry (its replicas drain, then stop); with `--file` the stored file too."""
    kv = await _bucket(nc, settings)
    removed: list = []
    try:
        spec = await livecatalog.remove(kv, name)
        removed.append(spec)
    except NotFound:
        if not options.with_file:
            raise
        spec = None
    if options.with_file:
        store_name = spec.store_name if spec is not None and spec.store_name else name
        removed.append(await modelstore.describe(nc.jetstream(), store_name))
        await modelstore.remove(nc.jetstream(), store_name)
    return removed


async def listing(nc, settings) -> list[ModelSpec]:
    specs = await livecatalog.load(await _bucket(nc, settings))
    return sorted(specs.values(), key=lambda s: s.name)


def _autoscale(spec: ModelSpec) -> str:
    a = spec.autoscale
    return f"{a.min_replicas}-{a.max_replicas}" if a else "-"


def render_specs(specs: list[ModelSpec]) -> str:
    rows = [[s.name, s.source, (s.digest[:19] + "…") if s.digest else "-", ",".join(s.roles), s.replicas,
             _autoscale(s), s.node or "-", s.n_ctx, s.threads or "auto", s.max_batch] for s in specs]
    return render(["model", "source", "digest", "roles", "replicas", "autoscale", "node", "n_ctx", "threads",
                   "max_batch"], rows)

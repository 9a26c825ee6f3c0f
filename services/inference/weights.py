"""Which bytes a model's replicas load, and where each node finds them.

A catalogue source `store:NAME` is the object NAME of the bus's model store (shared/modelstore.py): the node a
replica is placed on gets it into its own cache through its agent (`magi.node.<node>.models.fetch`), verified by
digest, and the replica loads that file. The head (this service) needs the model too, for its tokenizer
(context.py), and gets it the same way for its own node. With no agent answering for this service's own node
(the inference service alone, as in benchmarks and some tests) the service fetches into its own cache
(`$MAGI_HOME/models`) directly; a remote node must have an agent.

A local source (a .gguf path or a package) is hashed once at start (the digest kept per path, size and mtime in
the cache folder, so a restart does not rehash an unchanged file); a catalogue `digest` that differs refuses
the model. Every replica reports the digest it loads (`magi.infer.models`), and a request may ask for one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from nats.aio.client import Client

from protos.node import ModelFetchReply, ModelFetchRequest
from services.inference.catalog import ModelSpec, resolve_model
from shared import bus, modelstore
from shared.config import Settings, load_settings
from shared.errors import MagiError, Unavailable, Unprocessable

log = logging.getLogger("magi.inference.weights")

# A node's agent answers a fetch when the file is in its cache: a download of many GB takes minutes.
FETCH_TIMEOUT_S = 1800.0
NO_RESPONDERS = "no service is answering"


@dataclass(frozen=True)
class Weights:
    """A model's file as one node sees it."""

    path: str
    digest: str = ""  # sha256:<hex>; "" for a vLLM model folder (not hashed)
    size: int = 0  # bytes a node without it downloads (store models), else the file's size
    store: str = ""  # the model store's object name, for `store:` sources


def local_weights(spec: ModelSpec, digest_folder: Path) -> Weights:
    """A local source's file and digest, refused when the catalogue names other bytes (blocking)."""
    path = resolve_model(spec)
    if path.is_dir():  # a vLLM model folder: the catalogue refuses a digest for one
        return Weights(path=str(path))
    digest = modelstore.known_file_digest(path, digest_folder)
    if spec.digest and digest != spec.digest:
        raise Unprocessable(f"model {spec.name}: {path} is {digest}, not the catalogue's digest {spec.digest}",
                            field="digest")
    return Weights(path=str(path), digest=digest, size=path.stat().st_size)


HeadWeights = Callable[[ModelSpec], Awaitable[Weights]]


async def local_head(spec: ModelSpec) -> Weights:
    """A local source's file and digest (the router's default, without a bus): hashed off the event loop, the
    digest kept in `$MAGI_HOME/models`."""
    return await asyncio.to_thread(local_weights, spec, load_settings().home_path / "models")


class ModelFiles:
    """Gets a model's file onto a node: through that node's agent, or into this service's own cache."""

    def __init__(self, settings: Settings, nc: Client | None) -> None:
        self.settings = settings
        self.nc = nc
        self.cache = modelstore.ModelCache(settings.home_path / "models", settings.model_cache_bytes)
        self.in_use: set[str] = set()  # digests this service fetched itself: never evicted by its own fetches

    async def head(self, spec: ModelSpec) -> Weights:
        """The model's file on this service's node: what its tokenizer reads, and what every replica must match."""
        if not spec.store_name:
            return await asyncio.to_thread(local_weights, spec, self.cache.root)
        return await self.on_node(spec, self.settings.node(), spec.digest)

    async def on_node(self, spec: ModelSpec, node: str, digest: str) -> Weights:
        """A store model's verified file on `node`, exactly `digest` (when given)."""
        request = ModelFetchRequest(name=spec.store_name, digest=digest)
        if self.nc is None:
            raise Unavailable(f"model {spec.name} is in the bus's model store and this service has no bus",
                              field="source")
        try:
            reply = await bus.request(self.nc, f"magi.node.{node}.models.fetch", request, ModelFetchReply,
                                      timeout=FETCH_TIMEOUT_S)
        except MagiError as exc:
            if not (exc.code == 503 and NO_RESPONDERS in exc.message and node == self.settings.node()):
                raise
            return await self._direct(request)
        if digest and reply.digest != digest:  # the agent checks this too; a replica must load exactly these bytes
            raise Unprocessable(f"node {node} fetched {reply.digest} for {spec.name}, not {digest}", field="digest")
        log.info("model on node", extra={"model": spec.name, "node": node, "digest": reply.digest,
                                         "cached": reply.cached, "fetch_ms": reply.fetch_ms})
        return Weights(path=reply.path, digest=reply.digest, size=reply.size, store=spec.store_name)

    async def _direct(self, request: ModelFetchRequest) -> Weights:
        assert self.nc is not None
        model, path = await modelstore.fetch(self.nc.jetstream(), request.name, self.cache, digest=request.digest,
                                             keep=frozenset(self.in_use))
        self.in_use.add(model.digest)
        return Weights(path=str(path), digest=model.digest, size=model.size, store=request.name)

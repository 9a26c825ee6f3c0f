"""Wiring the live catalogue into the inference service: the catalogue it starts from (the bucket, seeded
from the YAML on the first start), then the watch that reconciles every change and the autoscaler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

from nats.aio.client import Client
from nats.js.kv import KeyValue

from services.inference import livecatalog
from services.inference.autoscale import Autoscaler
from services.inference.catalog import Catalog, load_catalog
from services.inference.reconcile import Reconciler
from services.inference.router import Router
from shared.config import Settings

log = logging.getLogger("magi.inference.live")

REWATCH_PAUSE_S = 1.0  # before watching again after the watch broke (NATS away, the bucket recreated)


async def starting_catalogue(nc: Client, settings: Settings) -> tuple[KeyValue, Catalog]:
    """The bucket, and the models it holds; on the very first start it is seeded from MAGI_MODELS_FILE (or the
    built-in catalogue), which is read only then."""
    kv = await livecatalog.open_bucket(nc.jetstream(), create=True, replicas=settings.stream_replicas)
    seeding = await livecatalog.never_written(kv)
    if seeding:
        await livecatalog.seed(kv, load_catalog(settings.models_file))
    specs = await livecatalog.load(kv)
    if not seeding and settings.models_file:
        _say_the_bucket_wins(load_catalog(settings.models_file), specs)
    # Built directly, not converted: an operator may have removed every model (then nothing is served).
    return kv, Catalog(models=sorted(specs.values(), key=lambda s: s.name))


def _say_the_bucket_wins(yaml_catalogue: Catalog, specs: dict) -> None:
    """An operator who edits MAGI_MODELS_FILE after the first start is told why nothing changed."""
    differs = sorted({m.name for m in yaml_catalogue.models if specs.get(m.name) != m} |
                     (set(specs) - {m.name for m in yaml_catalogue.models}))
    if differs:
        log.warning("MAGI_MODELS_FILE differs from the catalogue bucket, which wins after the first start "
                    "(change models with magi models add|set|rm|scale)", extra={"models": differs})


async def _watch_forever(reconciler: Reconciler, kv: KeyValue, nc: Client) -> None:
    while not nc.is_closed:  # closed: the service is stopping
        try:
            await reconciler.follow(livecatalog.watch(kv))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # level-triggered: watching again replays every model's current entry
            if nc.is_closed:
                return
            log.warning("catalogue watch broke; watching again", extra={"error": f"{type(exc).__name__}: {exc}"})
        await asyncio.sleep(REWATCH_PAUSE_S)


def follow_catalogue(router: Router, kv: KeyValue, nc: Client) -> tuple[Reconciler, Callable[[], Awaitable[None]]]:
    """Start applying the bucket's changes and autoscaling; returns the reconciler and what stops both."""
    reconciler = Reconciler(router)

    async def scale(name: str, replicas: int) -> None:
        await livecatalog.change(kv, name, lambda raw: {**raw, "replicas": replicas})

    tasks = [asyncio.create_task(_watch_forever(reconciler, kv, nc), name="catalogue-watch"),
             asyncio.create_task(reconciler.resync_forever(), name="catalogue-resync"),
             asyncio.create_task(Autoscaler(router, scale).run(), name="autoscaler")]

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reconciler.close()

    return reconciler, stop

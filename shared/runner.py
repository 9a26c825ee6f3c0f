"""Common `main()` for service processes: logging, tracing, connect, serve until SIGTERM, drain."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from shared.config import Settings, load_settings
from shared.logs import setup_logging
from shared.service import MagiService, wait_for_signal
from shared.telemetry import setup_tracing

log = logging.getLogger("magi.runner")

# build(settings) returns the service plus an async cleanup to run after the service stops.
Builder = Callable[[Settings], Awaitable[tuple[MagiService, Callable[[], Awaitable[None]]]]]


def run_service(name: str, build: Builder) -> None:
    setup_logging(name)
    settings = load_settings()
    provider = setup_tracing(name, settings.home_path)

    async def serve() -> None:
        service, cleanup = await build(settings)
        try:
            await service.start()
            await wait_for_signal()
        finally:
            await service.close()
            await cleanup()
            log.info("stopped", extra={"service": name})

    try:
        asyncio.run(serve())
    finally:
        provider.shutdown()

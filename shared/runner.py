"""Common `main()` for service processes: logging, tracing, connect, serve until SIGTERM, drain."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

from shared import sdnotify
from shared.config import Settings, load_settings
from shared.logs import setup_logging
from shared.service import MagiService, wait_for_signal
from shared.telemetry import setup_tracing

log = logging.getLogger("magi.runner")

# build(settings) returns the service plus an async cleanup to run after the service stops, and optionally a
# third callable, run first on shutdown while the bus is still connected: a front door (the gateway's HTTP
# server) stops taking work and finishes what it holds before the bus under it goes away.
Step = Callable[[], Awaitable[None]]
Builder = Callable[[Settings], Awaitable[tuple[MagiService, Step] | tuple[MagiService, Step, Step]]]


async def _watchdog(interval: float) -> None:
    """Ping systemd's watchdog while the event loop runs: a hung loop stops the pings and gets restarted."""
    while True:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def run_service(name: str, build: Builder, *, own_watchdog: bool = False) -> None:
    """`own_watchdog`: the service pings systemd itself (the agent does, with every heartbeat)."""
    setup_logging(name)
    settings = load_settings()
    provider = setup_tracing(name, settings.home_path)

    async def serve() -> None:
        service, cleanup, *first = await build(settings)
        pinger = None
        try:
            await service.start()
            sdnotify.notify("READY=1")
            usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
            if usec and not own_watchdog:
                pinger = asyncio.create_task(_watchdog(usec / 2e6))
            await wait_for_signal()
        finally:
            sdnotify.notify("STOPPING=1")
            if pinger is not None:
                pinger.cancel()
            for stop_intake in first:
                await stop_intake()
            await service.close()
            await cleanup()
            log.info("stopped", extra={"service": name})

    try:
        asyncio.run(serve())
    finally:
        provider.shutdown()

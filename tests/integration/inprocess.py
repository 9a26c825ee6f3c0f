"""Services started inside the test process, the way `run_service` starts them (not a test module)."""

from __future__ import annotations

from shared.config import Settings


class Running:
    """build(), then start(); stop() undoes both."""

    def __init__(self) -> None:
        self.stops: dict[str, object] = {}

    async def start(self, name: str, module, settings: Settings) -> None:
        service, cleanup, *first = await module.build(settings)
        await service.start()

        async def stop() -> None:
            for stop_intake in first:
                await stop_intake()
            await service.close()
            await cleanup()

        self.stops[name] = stop

    async def stop(self, name: str) -> None:
        await self.stops.pop(name)()

    async def stop_all(self) -> None:
        for name in list(self.stops):
            await self.stop(name)

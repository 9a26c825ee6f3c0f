"""Heartbeats on `magi.node.<node>.heartbeat`; the latest sample on `magi.node.<node>.info`."""

from __future__ import annotations

import asyncio
import logging
import re

import msgspec

from protos.common import Empty
from protos.node import Heartbeat
from services.agent.resources import gpus, sample
from shared.config import Settings
from shared.errors import BadRequest
from shared.service import MagiService, RequestContext

VERSION = "0.1.0"
log = logging.getLogger("magi.agent")
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class Agent:
    def __init__(self, service: MagiService, node: str, settings: Settings) -> None:
        self.service = service
        self.node = node
        self.settings = settings
        self.latest: Heartbeat | None = None
        self._gpus = gpus()  # GPUs do not come and go; memory use is refreshed with each sample below
        self._task: asyncio.Task | None = None

    async def beat(self, seq: int) -> Heartbeat:
        gpu_list = gpus() if self._gpus else []
        hb = await asyncio.to_thread(sample, self.node, seq, self.settings.home_path, [], gpu_list)
        self.latest = hb
        await self.service.nc.publish(f"magi.node.{self.node}.heartbeat", msgspec.json.encode(hb))
        return hb

    async def run(self) -> None:
        seq = 0
        while True:
            seq += 1
            try:
                await self.beat(seq)
            except Exception:  # a failed sample must not end the heartbeats
                log.exception("heartbeat failed", extra={"node": self.node})
            await asyncio.sleep(self.settings.heartbeat_s)

    async def info(self, req: Empty, ctx: RequestContext) -> Heartbeat:
        return self.latest or await self.beat(0)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def node_name(settings: Settings) -> str:
    name = settings.node()
    if not _NODE_NAME.match(name):
        raise BadRequest(f"node name {name!r} must be letters, digits, '-' or '_' (set MAGI_NODE_NAME)", field="node_name")
    return name


async def build(settings: Settings):
    node = node_name(settings)
    service = MagiService("magi-agent", VERSION, f"Node agent of {node}", settings)
    agent = Agent(service, node, settings)
    service.endpoint(f"magi.node.{node}.info", Empty, agent.info)
    await service.connect()
    agent.start()
    return service, agent.close

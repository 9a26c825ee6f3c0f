"""The newest heartbeat of each node, from one subscription the dashboard and `/metrics` share."""

from __future__ import annotations

import time
from typing import Callable

import msgspec
from nats.aio.client import Client

from protos.node import Heartbeat

_heartbeat = msgspec.json.Decoder(Heartbeat)


class Heartbeats:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.latest: dict[str, tuple[Heartbeat, float]] = {}  # node -> (newest heartbeat, received at, monotonic)
        self.listeners: list[Callable[[Heartbeat], None]] = []

    async def start(self) -> None:
        """Hear heartbeats (the subscription ends with the gateway's connection)."""
        await self.nc.subscribe("magi.node.*.heartbeat", cb=self._on_heartbeat)

    async def _on_heartbeat(self, msg) -> None:
        try:
            hb = _heartbeat.decode(msg.data)
        except msgspec.DecodeError:
            return
        if msg.subject.split(".")[2] != hb.node:
            return  # a node speaks only for itself (the agent's permissions say so too)
        self.latest[hb.node] = (hb, time.monotonic())
        for listener in self.listeners:
            listener(hb)

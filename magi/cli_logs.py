"""`magi logs NODE [INSTANCE] [-f]`: an instance's recent output from its node's agent, then every new line.

The agent keeps each instance's output in a file and serves its tail on `magi.node.<node>.logs`; it also
publishes each line on `magi.node.<node>.logs.<instance>` with the file offset just past it. A follower
subscribes before it reads the tail and drops live lines at or below the tail's offset, so a line written
meanwhile is printed once: in the tail or live, never both, never neither.
"""

from __future__ import annotations

import asyncio
import json
import sys

from nats.aio.client import Client

from protos.node import LOG_OFFSET_HEADER, LogsReply, LogsRequest
from shared import bus
from shared.errors import Forbidden, MagiError


class Printer:
    def __init__(self, node: str, *, as_json: bool, prefix: bool) -> None:
        self.node, self.as_json, self.prefix = node, as_json, prefix

    def __call__(self, instance: str, line: str) -> None:
        if self.as_json:
            print(json.dumps({"node": self.node, "instance": instance, "line": line}), flush=True)
        else:
            print(f"{instance} | {line}" if self.prefix else line, flush=True)


async def _subscribe(nc: Client, subject: str, role: str) -> asyncio.Queue:
    live: asyncio.Queue = asyncio.Queue()

    async def queue(msg) -> None:
        live.put_nowait(msg)

    await nc.subscribe(subject, cb=queue)
    await nc.flush()  # on the server before the tail is read; a refusal has arrived by the flush's PONG
    if bus.refused(nc, subject):
        raise Forbidden(f"the {role!r} identity may not read {subject}")
    return live


async def _tail(nc: Client, node: str, instance: str, lines: int, show: Printer) -> dict[str, int]:
    """Print the tail; return each instance's offset it ends at."""
    reply = await bus.request(nc, f"magi.node.{node}.logs", LogsRequest(instance=instance, lines=lines), LogsReply,
                              timeout=10)
    if not reply.logs:
        print(f"magi logs: node {node} has no instance logs", file=sys.stderr)
    for log in reply.logs:
        for line in log.lines:
            show(log.instance_id, line)
    return {log.instance_id: log.offset for log in reply.logs}


async def show_logs(nc: Client, *, node: str, instance: str, lines: int, follow: bool, as_json: bool,
                    role: str) -> None:
    show = Printer(node, as_json=as_json, prefix=not instance)
    live = await _subscribe(nc, f"magi.node.{node}.logs.{instance or '*'}", role) if follow else None
    try:
        seen = await _tail(nc, node, instance, lines, show)
    except MagiError as exc:
        if live is None or isinstance(exc, Forbidden):
            raise
        print(f"magi logs: no earlier lines ({exc.message}); following", file=sys.stderr)
        seen = {}
    while live is not None:
        msg = await live.get()
        name = msg.subject.rsplit(".", 1)[-1]
        offset = int((msg.headers or {}).get(LOG_OFFSET_HEADER, 0) or 0)
        if name in seen and offset <= seen[name]:
            continue  # printed with the tail
        seen.pop(name, None)
        show(name, msg.data.decode(errors="replace"))

"""A scheduler and named node agents as separate OS processes on one machine, over a private
NATS + Redis: for failover tests and the failover benchmark."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from magi import stack
from magi.procs import free_port, stop_tree
from protos.node import NodesReply
from protos.sched import InstanceSpec, PlaceReply, PlaceRequest
from shared import bus
from shared.roles import agent_identity

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


class LocalCluster:
    """A scheduler and named agents, each its own process, on a private NATS + Redis."""

    def __init__(self, home: Path, heartbeat_s: float) -> None:
        self.cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=())
        self.heartbeat_s = heartbeat_s
        self.procs: dict[str, subprocess.Popen] = {}

    async def up(self) -> None:
        self.state = await stack.up(self.cfg)
        # The agents may run this Python (the test and benchmark instances), nothing else.
        self.policy = self.cfg.home / "agent.yaml"
        self.policy.write_text(f"programs: [{json.dumps(sys.executable)}]\n")
        self.nc = await stack.connect_as(self.cfg.home, self.state.nats_url)

    def env(self, node: str = "") -> dict[str, str]:
        # Each process has a home of its own, so it is told its identity's seed file outright.
        seed = self.cfg.secrets / f"{agent_identity(node) if node else 'scheduler'}.nk"
        env = dict(os.environ, MAGI_NATS_URL=self.state.nats_url, MAGI_REDIS_URL=self.state.redis_url,
                   MAGI_HOME=str(self.cfg.home / (node or "sched")), MAGI_HEARTBEAT_S=str(self.heartbeat_s),
                   MAGI_NATS_CREDS=str(seed), MAGI_AGENT_POLICY=str(self.policy))
        if node:
            env["MAGI_NODE_NAME"] = node
            env["MAGI_NODE_LABELS"] = "max_instances=4"
        return env

    async def start(self, key: str, module: str, node: str = "") -> None:
        if node:
            await stack.add_agent(self.cfg, self.state, node)
        log = open(self.cfg.home / f"{key}.log", "ab")
        self.procs[key] = subprocess.Popen([sys.executable, "-m", module], env=self.env(node), stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        name = "magi-agent" if node else "magi-scheduler"
        await self.until(lambda: self._answers(name, node), timeout=20)

    async def _answers(self, name: str, node: str) -> bool:
        subject = f"magi.node.{node}.info" if node else "magi.sched.nodes"
        try:
            await self.nc.request(subject, b"{}", timeout=0.3)
            return True
        except Exception:
            return False

    async def until(self, predicate, timeout: float) -> float:
        start = time.monotonic()
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, "condition not met in time"
            await asyncio.sleep(0.05)

    async def running_on(self) -> dict[str, tuple[str, int]]:
        """instance -> (node, pid) for instances an agent reports running."""
        reply = await bus.request(self.nc, "magi.sched.nodes", b"{}", NodesReply, timeout=5)
        return {i.instance_id: (n.name, i.pid) for n in reply.nodes if n.status != "UNAVAILABLE"
                for i in n.heartbeat.instances if i.state == "running"}

    async def down(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                stop_tree(proc.pid, grace=10)
        await self.nc.close()
        stack.down(self.cfg.home)

    async def place_on(self, instance_id: str, node: str, command: list[str] = SLEEPER) -> int:
        """Pin one instance to `node`, wait until its agent runs it, return its pid."""
        spec = InstanceSpec(instance_id=instance_id, ram_gb=0.5, command=command, restart="always")
        reply = await bus.request(self.nc, "magi.sched.place",
                                  PlaceRequest(instances=[spec], placement={instance_id: node}), PlaceReply, timeout=5)
        if reply.placements != {instance_id: node}:
            raise RuntimeError(f"placement refused: {reply.unplaced}")
        await self.until(lambda: self.runs_on(instance_id, node), timeout=10)
        return (await self.running_on())[instance_id][1]

    async def runs_on(self, instance_id: str, node: str) -> bool:
        return (await self.running_on()).get(instance_id, ("", 0))[0] == node

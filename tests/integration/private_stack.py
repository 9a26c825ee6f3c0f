"""A stack of its own for tests that need a catalogue other than the session's (not a test module)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import yaml

from magi import stack
from magi.procs import free_port
from shared.config import Settings


@contextlib.contextmanager
def inference_stack(home: Path, catalogue: dict, services: tuple[str, ...] = ("inference",)):
    """NATS, Redis and the inference service (and any other `services`), serving `catalogue`; stopped however
    the tests end."""
    (home / "models.yaml").write_text(yaml.safe_dump(catalogue))
    cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=services,
                            extra_env={"MAGI_MODELS_FILE": str(home / "models.yaml")})
    state = asyncio.run(stack.up(cfg))
    try:
        yield state
    finally:
        stack.down(home)


@contextlib.contextmanager
def agent_servers(home: Path, agents: tuple[str, ...], **settings):
    """NATS and Redis from the local stack's own code with credentials for `agents` and no MAGI service (the
    test runs agent and scheduler in-process): yields the Settings those use, the first agent's node, with a
    policy that lets the agent run this Python."""
    cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=(), agents=agents)
    state = asyncio.run(stack.up(cfg))
    policy = home / "agent.yaml"
    policy.write_text(f"programs: [{json.dumps(sys.executable)}]\n")
    try:
        # The services run in-process with the stack's home, so each finds its own role's seed there.
        yield Settings(nats_url=state.nats_url, redis_url=state.redis_url, home=str(home), node_name=agents[0],
                       agent_policy=str(policy), **settings)
    finally:
        stack.down(home)


@contextlib.asynccontextmanager
async def scheduler_and_two_agents(tmp_path: Path):
    """A LocalCluster with a scheduler and the agents of node-a and node-b, heartbeating every second."""
    from magi.localcluster import LocalCluster

    c = LocalCluster(tmp_path, heartbeat_s=1.0)
    await c.up()
    await c.start("sched", "services.scheduler")
    await c.start("a", "services.agent", "node-a")
    await c.start("b", "services.agent", "node-b")
    try:
        yield c
    finally:
        await c.down()

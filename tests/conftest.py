"""Session fixtures: one real local stack (NATS, Redis, PostgreSQL + pgvector, every service with the
real SmolLM2 model) on free ports in a temporary home, started once and stopped at the end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from magi import stack
from magi.procs import free_port
from shared.config import Settings


@pytest.fixture(scope="session")
def magi_stack(tmp_path_factory) -> stack.StackState:
    home = Path(tmp_path_factory.mktemp("magi-home"))
    cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), node_name="testnode",
                            extra_env={"MAGI_HEARTBEAT_S": "0.5"})
    state = asyncio.run(stack.up(cfg))
    try:
        yield state
    finally:
        stack.down(home)


@pytest.fixture(scope="session")
def magi_settings(magi_stack) -> Settings:
    return Settings(nats_url=magi_stack.nats_url, redis_url=magi_stack.redis_url, pg_dsn=magi_stack.pg_dsn,
                    home=magi_stack.home, node_name="testnode")


@pytest.fixture
def bus_stack(magi_stack):
    """The servers `nc` connects to: anything with `nats_url` and `home` (where the bus's credentials live).
    A module with servers of its own overrides this."""
    return magi_stack


@pytest.fixture
def nats_url(bus_stack) -> str:
    return bus_stack.nats_url


@pytest.fixture
def stack_home(bus_stack) -> str:
    return bus_stack.home


@pytest.fixture
async def nc(nats_url, stack_home):
    """An admin connection: tests drive every subject, as an operator would."""
    client = await stack.connect_as(stack_home, nats_url, "admin")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def gateway_url(magi_stack) -> str:
    """The session stack's OpenAI-compatible API (`http://127.0.0.1:<free port>/v1`)."""
    assert magi_stack.http_url, "the session stack runs no gateway"
    return magi_stack.http_url


@pytest.fixture(scope="session")
def api_key(magi_stack) -> str:
    """The bearer key `magi up` wrote for the session stack's gateway."""
    return (Path(magi_stack.home) / "secrets" / "api_key").read_text().strip()

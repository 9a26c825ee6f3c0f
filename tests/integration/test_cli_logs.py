"""`magi logs`: an instance's recent lines from its node's agent, then (-f) every new one, none twice.

The scheduler and the agent run in-process against a real nats-server on a free port; the instances are
real processes and `magi` runs as a user runs it, in its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from tests.integration.private_stack import agent_servers
from tests.integration.test_fencing import _answers, _healthy, place, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NODE = "fencer"  # test_fencing's helpers ask this node
COUNT = "import time\nfor i in range(1, 6): print(f'line {i}', flush=True)\ntime.sleep(600)"
# A line every 20 ms: a follower that starts mid-stream must join the tail to the live lines exactly.
STREAM = "import itertools, time\nfor i in itertools.count(1):\n    print(f'n={i}', flush=True)\n    time.sleep(0.02)"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with agent_servers(tmp_path_factory.mktemp("cli-logs"), (NODE,), heartbeat_s=0.2) as settings:
        yield settings


@pytest.fixture
def bus_stack(servers):
    return servers


@pytest.fixture
async def cluster(servers, nc):
    import redis.asyncio as aioredis

    from services.agent import service as agent_service
    from services.scheduler import service as scheduler_service
    from tests.integration.inprocess import Running

    client = aioredis.from_url(servers.redis_url)
    await client.flushdb()
    await client.aclose()
    running = Running()
    try:
        await running.start("scheduler", scheduler_service, servers)
        await running.start("agent", agent_service, servers)
        await until(lambda: _answers(nc))
        await until(lambda: _healthy(nc))
        yield running
    finally:
        await running.stop_all()


def _magi(servers, *args: str, **options):
    """`magi` in its own process; the stack is found through --home alone (its state names the NATS URL)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAGI_NATS_URL", "MAGI_HOME")}
    argv = [sys.executable, "-m", "magi.cli", *args, "--home", servers.home]
    if options.pop("popen", False):
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def _log_file(servers, instance: str):
    from pathlib import Path

    return Path(servers.home) / "instances" / f"{instance}.log"


async def test_recent_lines_of_an_instance_and_of_every_instance(servers, cluster, nc):
    await place(nc, "counter", COUNT)
    await until(lambda: _async(_log_file(servers, "counter").exists()
                               and _log_file(servers, "counter").read_text().count("\n") == 5))
    out = await asyncio.to_thread(_magi, servers, "logs", NODE, "counter", "-n", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["line 3", "line 4", "line 5"]
    as_json = await asyncio.to_thread(_magi, servers, "logs", NODE, "counter", "--json")
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["line"] for r in rows] == [f"line {i}" for i in range(1, 6)]
    assert {(r["node"], r["instance"]) for r in rows} == {(NODE, "counter")}
    every = await asyncio.to_thread(_magi, servers, "logs", NODE, "-n", "1")
    assert every.returncode == 0 and "counter | line 5" in every.stdout.splitlines()


async def test_unknown_instance_fails_and_an_absent_node_is_unavailable(servers, cluster):
    unknown = await asyncio.to_thread(_magi, servers, "logs", NODE, "nosuch")
    assert unknown.returncode == 1 and f"no log of instance nosuch on node {NODE}" in unknown.stderr
    absent = await asyncio.to_thread(_magi, servers, "logs", "nonode", "x")
    assert absent.returncode == 3 and "Traceback" not in absent.stderr, absent.stderr
    for follow in ([], ["-f"]):  # instance logs are the operator's: a client identity is refused, not left waiting
        refused = await asyncio.to_thread(_magi, servers, "logs", NODE, "x", "--role", "client", *follow)
        assert refused.returncode == 2 and "may not" in refused.stderr, refused.stderr


async def test_follow_joins_the_tail_to_live_lines_without_a_gap_or_a_repeat(servers, cluster, nc):
    await place(nc, "stream", STREAM)
    await until(lambda: _async(_log_file(servers, "stream").exists()
                               and _log_file(servers, "stream").stat().st_size > 100))
    follower = _magi(servers, "logs", NODE, "stream", "-f", "-n", "5", "--json", popen=True)
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 30
        while len(seen) < 60 and time.monotonic() < deadline:
            line = await asyncio.to_thread(follower.stdout.readline)
            if not line:
                break
            seen.append(int(json.loads(line)["line"].removeprefix("n=")))
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    assert len(seen) == 60, follower.stderr.read()
    assert seen == list(range(seen[0], seen[0] + 60))  # consecutive: the tail's 5, then live, none twice or lost


async def _async(value):
    return value

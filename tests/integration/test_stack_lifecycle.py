"""`magi down` leaves no process and no listening port behind, Ray included."""

import asyncio
import subprocess
import sys

import psutil
import pytest

from shared import stack
from shared.procs import free_port, port_is_free, process_tree

pytestmark = pytest.mark.integration


def test_down_stops_every_process_and_port(tmp_path):
    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=("inference",))
    state = asyncio.run(stack.up(cfg))
    pids = {p.pid for c in state.components for p in process_tree(c.pid)}
    assert len(pids) > 5  # nats, redis, postgres + its workers, inference + Ray's processes
    assert not port_is_free(cfg.nats_port) and not port_is_free(cfg.redis_port)

    out = subprocess.run([sys.executable, "-m", "shared.cli", "down", "--home", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after down: {[psutil.Process(p).cmdline()[:2] for p in alive]}"
    assert port_is_free(cfg.nats_port) and port_is_free(cfg.redis_port)
    assert not (tmp_path / "run" / "stack.json").exists()


def test_up_refuses_a_second_stack_in_the_same_home(tmp_path):
    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=())
    asyncio.run(stack.up(cfg))
    try:
        with pytest.raises(stack.StackError):
            asyncio.run(stack.up(cfg))
    finally:
        stack.down(tmp_path)

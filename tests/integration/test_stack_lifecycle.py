"""`magi down` leaves no process and no listening port behind, Ray included."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from magi import stack
from magi.procs import free_port, pid_alive, port_is_free, process_tree, stop_tree

pytestmark = pytest.mark.integration


def test_down_stops_every_process_and_port(tmp_path):
    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=("inference",))
    state = asyncio.run(stack.up(cfg))
    pids = {p.pid for c in state.components for p in process_tree(c.pid)}
    assert len(pids) > 5  # nats, redis, postgres + its workers, inference + Ray's processes
    assert not port_is_free(cfg.nats_port) and not port_is_free(cfg.redis_port)

    out = subprocess.run([sys.executable, "-m", "magi.cli", "down", "--home", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after down: {[psutil.Process(p).cmdline()[:2] for p in alive]}"
    assert port_is_free(cfg.nats_port) and port_is_free(cfg.redis_port)
    assert not (tmp_path / "run" / "stack.json").exists()


def test_the_keeper_leaves_when_its_stack_state_is_gone(tmp_path):
    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=())
    state = asyncio.run(stack.up(cfg))
    keeper = next(c.pid for c in state.components if c.name == "keeper")
    try:
        cfg.state_file.unlink()  # e.g. the home removed while the stack ran
        deadline = time.monotonic() + 10
        while pid_alive(keeper) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(keeper), "a keeper without a stack would keep orphans alive for ever"
    finally:
        stack.down_state(state)


def test_up_refuses_a_second_stack_in_the_same_home(tmp_path):
    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=())
    asyncio.run(stack.up(cfg))
    try:
        with pytest.raises(stack.StackError):
            asyncio.run(stack.up(cfg))
    finally:
        stack.down(tmp_path)


def _component(home, name: str) -> tuple[int, bool, int]:
    return next((pid, alive, restarts) for n, pid, alive, restarts in stack.status(home) if n == name)


def _wait_restarted(home, name: str, old_pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, alive, restarts = _component(home, name)
        if pid != old_pid and alive and restarts >= 1:
            return pid
        time.sleep(0.2)
    raise AssertionError(f"{name} was not restarted within {timeout} s: {stack.status(home)}")


async def _frozen_service_loses_its_subscriptions(home, nats_url: str) -> None:
    """nats-server drops a client that misses two 5 s pings: requests then get "no responders" at once
    instead of waiting on a process that cannot answer."""
    pid, _, _ = _component(home, "consensus")
    nc = await stack.connect_as(home, nats_url)
    os.kill(pid, signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        while True:
            try:
                await nc.request("$SRV.PING.magi-consensus", b"", timeout=1)
            except Exception as exc:
                if type(exc).__name__ == "NoRespondersError":
                    break
            assert time.monotonic() - frozen < 25, "a frozen service kept its subscriptions"
            await asyncio.sleep(0.5)
        assert time.monotonic() - frozen >= 5  # not before a missed ping
    finally:
        os.kill(pid, signal.SIGCONT)
        await nc.close()


def test_keeper_restarts_a_killed_service_and_nats(tmp_path):
    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=("consensus",))
    state = asyncio.run(stack.up(cfg))
    try:
        for name in ("consensus", "nats"):
            old, _, _ = _component(tmp_path, name)
            os.kill(old, signal.SIGKILL)
            _wait_restarted(tmp_path, name, old)

        async def ping() -> None:
            nc = await stack.connect_as(tmp_path, state.nats_url)
            try:
                deadline = time.monotonic() + 30
                while True:  # the consensus service reconnects to the restarted NATS on its own
                    try:
                        await nc.request("$SRV.PING.magi-consensus", b"", timeout=1)
                        return
                    except Exception:
                        assert time.monotonic() < deadline, "consensus did not come back"
                        await asyncio.sleep(0.3)
            finally:
                await nc.close()

        asyncio.run(ping())
        asyncio.run(_frozen_service_loses_its_subscriptions(tmp_path, state.nats_url))
        asyncio.run(ping())  # woken, it reconnected on its own
        env = dict(os.environ, MAGI_HOME=str(tmp_path), MAGI_NATS_URL=state.nats_url)
        out = subprocess.run([sys.executable, "-m", "magi.cli", "status"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "restarts" in out.stdout and "magi-consensus" in out.stdout
        assert "died; restarting" in (tmp_path / "logs" / "keeper.log").read_text()
    finally:
        pids = [pid for _, pid, _, _ in stack.status(tmp_path)]
        stack.down(tmp_path)
    assert not any(pid_alive(pid) for pid in pids), "the keeper brought something back after down"


async def test_a_service_started_before_nats_waits_for_it_and_says_so_once(tmp_path, caplog):
    from shared.config import Settings
    from shared.service import MagiService

    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=())
    stack.ensure_credentials(cfg)
    service = MagiService("magi-consensus", "0.0.0", "test", Settings(nats_url=cfg.nats_url, home=str(tmp_path)))
    connecting = asyncio.create_task(service.connect())
    await asyncio.sleep(2.0)
    assert not connecting.done()
    nats = await asyncio.to_thread(stack.start_nats, cfg)
    try:
        nc = await asyncio.wait_for(connecting, 15)
        assert nc.is_connected
        said = [r for r in caplog.records if r.name == "magi.bus"]
        # About eight failed attempts in those 2 s: one line says so, not one per attempt.
        assert [r.getMessage() for r in said] == ["bus error"] and said[0].times == 1, said
        await nc.close()
    finally:
        stop_tree(nats.pid)

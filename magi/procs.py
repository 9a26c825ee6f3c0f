"""Process helpers for the local stack: free ports, readiness polling, stopping process trees."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import psutil

from shared.errors import StackError


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_free(port: int, what: str, how_to_change: str) -> None:
    if not port_is_free(port):
        raise StackError(f"port {port} for {what} is already in use on 127.0.0.1; {how_to_change}")


def wait_tcp(port: int, timeout: float, proc: psutil.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"process exited with {proc.returncode} before listening on {port}{tail_hint(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s{tail_hint(log)}")


def tail_hint(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n" + "\n".join(text)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, *, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Signal a process, give it `grace` seconds to stop its children, then kill whatever is left.

    The tree is collected before signalling: children (Ray's raylet and workers) are re-parented
    when their parent exits, and would otherwise escape.
    """
    tree = process_tree(pid)
    if not tree:
        return
    try:
        tree[0].send_signal(sig)
    except psutil.NoSuchProcess:
        pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

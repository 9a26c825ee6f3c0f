"""An RPC shard: one host's CPU serving part of a model's layers to a coordinating replica (see rpc.py).

Run one as the `RpcShard` Ray actor (Ray places it on a node), or as a child process for tests and
benchmarks (`spawn_local_shard`, which runs `python -m services.inference.shard`).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import ray

import services.inference.ray_runtime  # noqa: F401  (confines Ray to loopback before import)
from services.inference import rpc
from shared.config import DEFAULT_RPC_PORTS, port_range
from shared.errors import DeadlineExceeded, MagiError, Unavailable

log = logging.getLogger("magi.inference.shard")

READY_TIMEOUT_S = 30.0
_ATTEMPTS = 3  # a free port can be taken between picking it and the server binding it
_REPO = Path(__file__).resolve().parents[2]


def free_port(host: str) -> int:
    """A port of MAGI_RPC_PORTS free on `host` now (the range the README's firewall table names)."""
    ports = list(port_range(os.environ.get("MAGI_RPC_PORTS") or DEFAULT_RPC_PORTS))
    start = random.randrange(len(ports))  # shards starting together rarely try the same port first
    for port in ports[start:] + ports[:start]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise Unavailable(f"no free port for an RPC shard in MAGI_RPC_PORTS on {host}")


def _probe_host(bind: str) -> str:
    return "127.0.0.1" if bind == "0.0.0.0" else bind


def wait_listening(host: str, port: int, alive: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> bool:
    """True once the port accepts TCP connections; False if the server died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rpc.is_listening(_probe_host(host), port, timeout=0.2):
            return True
        if not alive():
            return False
        time.sleep(0.05)
    raise DeadlineExceeded(f"RPC shard on {host}:{port} did not listen within {timeout:.0f} s")


# ggml's OpenMP workers spin ~300k rounds before sleeping; shards compute one after the other, so
# an idle shard spinning takes the cores from the busy one. A short spin keeps the fast hand-off
# between ops inside a graph (OMP_WAIT_POLICY=PASSIVE, sleeping at once, halved tokens/s). libgomp
# reads it when it loads, so it must be in the environment before llama_cpp is imported.
SHARD_ENV = {"GOMP_SPINCOUNT": "10000"}


@ray.remote(num_cpus=0)  # like replicas: threads are sized by the caller, not by Ray's CPU accounting
class RpcShard:
    def __init__(self, host: str = "127.0.0.1", threads: int = 1, cache_dir: str | None = None,
                 allow_any_address: bool = False) -> None:
        for key, value in SHARD_ENV.items():
            os.environ.setdefault(key, value)
        # Empty: this node's own cluster address (MAGI_CLUSTER_ADDRESS), loopback unless set.
        host = host or os.environ.get("MAGI_CLUSTER_ADDRESS", "127.0.0.1")
        self.host = rpc.bind_host(host, allow_any_address)  # refuse a bad address before serving anything
        self.threads, self.cache_dir = threads, cache_dir
        self._endpoint = ""
        self._lock = threading.Lock()

    def endpoint(self, timeout: float = READY_TIMEOUT_S) -> str:
        """`host:port` of the running server, started on a free port on first call."""
        with self._lock:
            if not self._endpoint:
                self._endpoint = self._start(timeout)
            return self._endpoint

    def _start(self, timeout: float) -> str:
        for _ in range(_ATTEMPTS):
            port = free_port(_probe_host(self.host))
            failed: list[BaseException] = []
            thread = threading.Thread(target=self._serve, args=(port, failed), name="rpc-server", daemon=True)
            thread.start()
            if wait_listening(self.host, port, thread.is_alive, timeout):
                advertised = ray.util.get_node_ip_address() if self.host == "0.0.0.0" else self.host
                return f"{advertised}:{port}"
            log.warning("rpc shard failed to start", extra={"port": port, "error": str(failed[:1])})
        raise Unavailable(f"RPC shard could not listen on {self.host} after {_ATTEMPTS} ports")

    def _serve(self, port: int, failed: list[BaseException]) -> None:
        try:
            rpc.start_rpc_server(f"{self.host}:{port}", self.threads, self.cache_dir, allow_any_address=True)
        except MagiError as exc:  # the address was already checked; what is left is "could not listen"
            failed.append(exc)


# --- child process, for tests and benchmarks without Ray -------------------------------------------

def spawn_local_shard(host: str = "127.0.0.1", threads: int = 1, *, env: dict[str, str] | None = None,
                      timeout: float = READY_TIMEOUT_S) -> tuple[str, subprocess.Popen]:
    """Start a shard server in a child process on a free port; returns its endpoint and the process.

    Stop it with `stop_local_shard` (a server only ends when its process does).
    """
    host = rpc.bind_host(host)
    child_env = {**SHARD_ENV, **os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), child_env.get("PYTHONPATH")]))
    for _ in range(_ATTEMPTS):
        port = free_port(host)
        command = [sys.executable, "-m", "services.inference.shard", "--host", host, "--port", str(port),
                   "--threads", str(threads)]
        proc = subprocess.Popen(command, env=child_env, stdout=subprocess.DEVNULL, cwd=_REPO)
        try:
            if wait_listening(host, port, lambda: proc.poll() is None, timeout):
                return f"{host}:{port}", proc
        except DeadlineExceeded:
            stop_local_shard(proc)
            raise
        log.warning("rpc shard child exited before listening", extra={"port": port, "rc": proc.returncode})
    raise Unavailable(f"RPC shard child could not listen on {host} after {_ATTEMPTS} ports")


def stop_local_shard(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.inference.shard",
                                     description="Serve this host's CPU as a llama.cpp RPC shard (no authentication).")
    parser.add_argument("--host", default="127.0.0.1", help="this node's cluster address (never a public one)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="local tensor cache, speeds up repeated loads")
    parser.add_argument("--allow-any-address", action="store_true", help="permit 0.0.0.0 (every interface)")
    args = parser.parse_args(argv)
    from shared.logs import setup_logging

    setup_logging("rpc-shard")
    try:
        rpc.start_rpc_server(f"{args.host}:{args.port}", args.threads, args.cache_dir, args.allow_any_address)
    except MagiError as exc:
        log.error("rpc shard stopped", extra={"error": exc.message, "field": exc.field})
        return 2 if exc.code == 400 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

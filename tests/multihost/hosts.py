"""Hosts made of network namespaces: each has its own network stack and a veth into a switch namespace
holding a bridge. Everything is created by the test and deleted afterwards; no address outside the
private subnet is ever used. (The hosts share one filesystem: each node's Ray gets its own temp dir.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def can_make_hosts() -> str:
    """Why network-namespace hosts cannot be made here, or "" when they can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ss", "unshare"):
        if not shutil.which(tool):
            return f"needs {tool}"
    probe = f"magi-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str, ns: str = "") -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Host:
    name: str
    ns: str
    address: str
    root: Path  # its own files: logs, Ray's temp dir
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: list[str], env: dict[str, str], log_name: str, cwd: str | None = None) -> subprocess.Popen:
        """Run `argv` on this host (in its network namespace), its output in <root>/<log_name>.log."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{log_name}.log", "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], env: dict[str, str], timeout: float, cwd: str | None = None):
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every listening TCP socket in this host's network namespace."""
        out = subprocess.run(["ip", "netns", "exec", self.ns, "ss", "-ltnH"], capture_output=True, text=True,
                             check=True).stdout
        found = set()
        for line in out.splitlines():
            local = line.split()[3]
            address, _, port = local.rpartition(":")
            found.add((address.strip("[]").removeprefix("::ffff:"), int(port)))  # IPv4 on a dual-stack socket
        return found

    def wait_listening(self, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not any(p == port for _, p in self.listening()):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{self.name}: process exited with {proc.returncode} before listening on {port}; "
                                   f"see {self.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: nothing listened on {port} within {timeout:.0f} s; see {self.root}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


class Network:
    """A bridge in a switch namespace and one namespace per host, on a random private /24."""

    def __init__(self, names: list[str], work: Path) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.switch = f"magi-sw-{tag}"
        self.subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.hosts = {n: Host(n, f"magi-{n}-{tag}", f"{self.subnet}.{i + 1}", work / "hosts" / n)
                      for i, n in enumerate(names)}
        self.created: list[str] = []

    def up(self) -> None:
        _ip("netns", "add", self.switch)
        self.created.append(self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, host in enumerate(self.hosts.values()):
            _ip("netns", "add", host.ns)
            self.created.append(host.ns)
            _ip("link", "set", "lo", "up", ns=host.ns)
            # The pair is made inside the host, its far end then moved into the switch.
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}", ns=host.ns)
            _ip("link", "set", f"port{i}", "netns", self.switch, ns=host.ns)
            _ip("link", "set", f"port{i}", "master", "br0", ns=self.switch)
            _ip("link", "set", f"port{i}", "up", ns=self.switch)
            _ip("addr", "add", f"{host.address}/24", "dev", "eth0", ns=host.ns)
            _ip("link", "set", "eth0", "up", ns=host.ns)

    def attach_outsider(self, name: str) -> tuple[str, str]:
        """A namespace on a second network, wired to host `name`'s second interface (think of a house LAN
        next to the cluster network). Returns (its namespace, host `name`'s address on that network)."""
        host, outsider = self.hosts[name], f"{self.switch}-out"
        outside_net = f"10.{(int(self.subnet.split('.')[1]) + 1) % 250}.{self.subnet.split('.')[2]}"
        _ip("netns", "add", outsider)
        self.created.append(outsider)
        _ip("link", "set", "lo", "up", ns=outsider)
        _ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1", ns=outsider)
        _ip("link", "set", "eth1", "netns", host.ns, ns=outsider)
        _ip("addr", "add", f"{outside_net}.1/24", "dev", "eth1", ns=host.ns)
        _ip("link", "set", "eth1", "up", ns=host.ns)
        _ip("addr", "add", f"{outside_net}.2/24", "dev", "eth0", ns=outsider)
        _ip("link", "set", "eth0", "up", ns=outsider)
        return outsider, f"{outside_net}.1"

    def down(self) -> list[int]:
        """Kill every process left in the namespaces, delete them; return the pids that had to be killed."""
        killed = []
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(h.pids() for h in self.hosts.values()):
            time.sleep(0.2)
        for host in self.hosts.values():
            for pid in host.pids():
                killed.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in (p for h in self.hosts.values() for p in h.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return killed


def reachable(ns: str, address: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from namespace `ns` to address:port is accepted."""
    code = (f"import socket,sys; s=socket.socket(); s.settimeout({timeout});"
            f"sys.exit(s.connect_ex(({address!r}, {port})))")
    import sys as _sys

    done = subprocess.run(["ip", "netns", "exec", ns, _sys.executable, "-c", code], capture_output=True)
    return done.returncode == 0


def apply_firewall(host: Host, rules: Path) -> None:
    done = subprocess.run(["ip", "netns", "exec", host.ns, "nft", "-f", str(rules)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nft on {host.name}: {done.stderr.strip()}")


@contextmanager
def brought_up(make, prefix: str):
    """A cluster built by `make(work)` in a fresh `/var/tmp/<prefix>-<pid>`, up (its logs' tails if it does not
    come up); afterwards its namespaces are gone (checked) and its folders removed."""
    work = Path(f"/var/tmp/{prefix}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    built = make(work)
    try:
        try:
            built.up()
        except BaseException as exc:
            raise RuntimeError(f"cluster did not come up: {exc}\n{built.log_tails()}") from exc
        yield built
    finally:
        built.net.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(h.ns in left for h in built.net.hosts.values()), left
        shutil.rmtree(work, ignore_errors=True)
        for node in built.net.hosts:
            shutil.rmtree(built.ray_temp(node), ignore_errors=True)


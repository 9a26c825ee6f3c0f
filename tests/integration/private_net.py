"""Run a probe module in a private network namespace (only loopback) and read its one JSON line back.

Multi-node Ray binds the node address it is given; inside `unshare --net` that can only be loopback,
so a test may start a real Ray head and worker without anything listening beyond this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
REASON = "needs root, unshare(1), ip(8) and network namespaces"


def can_make_network_namespaces() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def run_probe(module: str, temp: str, timeout: float) -> dict:
    """`python -m module temp` in its own network namespace; no Ray process may outlive it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MAGI_"))}
    try:
        out = subprocess.run(["unshare", "--net", sys.executable, "-m", module, temp], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=timeout)
    finally:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"Ray processes of the probe outlived it: {left}"
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def connect_ray(ray, address: str, **options) -> None:
    """ray.init() against a head that may still be starting (up to a minute)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.init(address=address, log_to_driver=False, **options)
            return
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)

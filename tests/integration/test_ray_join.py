"""A node's agent joins the inference service's Ray cluster and actors pinned to its `magi_node:` resource
run there. Real Ray head and worker, inside a private network namespace so nothing can listen beyond
loopback (multi-node Ray binds the node address it is given, and the namespace has only loopback)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def _can_make_network_namespaces() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_make_network_namespaces(), reason="needs root, unshare(1), ip(8) and network namespaces")
def test_agent_ray_worker_joins_and_hosts_pinned_actors(tmp_path):
    temp = f"/tmp/magi-rayjoin-{os.getpid()}"  # short: Ray's unix socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MAGI_"))}
    try:
        out = subprocess.run(["unshare", "--net", sys.executable, "-m", "tests.integration.ray_join_probe", temp],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    finally:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"Ray processes of the probe outlived it: {left}"
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"nodes": ["magi_node:head", "magi_node:nodeb"], "ran_on": "nodeb"}

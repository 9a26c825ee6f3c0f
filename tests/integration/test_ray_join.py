"""A node's agent joins the inference service's Ray cluster and actors pinned to its `magi_node:` resource
run there. Real Ray head and worker, inside a private network namespace so nothing can listen beyond
loopback (multi-node Ray binds the node address it is given, and the namespace has only loopback)."""

import os
from pathlib import Path

import pytest

from tests.integration.private_net import REASON, can_make_network_namespaces, run_probe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not can_make_network_namespaces(), reason=REASON)
def test_agent_ray_worker_joins_and_hosts_pinned_actors(tmp_path):
    temp = f"/tmp/magi-rayjoin-{os.getpid()}"  # short: Ray's unix socket paths must fit 107 bytes
    result = run_probe("tests.integration.ray_join_probe", temp, timeout=200)
    assert result == {"nodes": ["magi_node:head", "magi_node:nodeb"], "ran_on": "nodeb"}

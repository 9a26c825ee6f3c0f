import json

import pytest

from services.agent.rayjoin import RAY_WORKER_ID, ray_worker_spec
from shared.config import load_settings

pytestmark = pytest.mark.unit


def test_no_join_without_a_head_address():
    assert ray_worker_spec(load_settings({}), "jetson") is None


def test_join_command_binds_the_cluster_address_and_marks_the_node():
    settings = load_settings({"MAGI_RAY_JOIN": "10.0.0.1:6380", "MAGI_CLUSTER_ADDRESS": "10.0.0.7"})
    spec = ray_worker_spec(settings, "jetson")
    assert spec.instance_id == RAY_WORKER_ID and spec.restart == "always"
    cmd = spec.command
    assert cmd[0].endswith("/ray") and cmd[1:3] == ["start", "--block"]
    assert cmd[cmd.index("--address") + 1] == "10.0.0.1:6380"
    assert cmd[cmd.index("--node-ip-address") + 1] == "10.0.0.7"
    assert json.loads(cmd[cmd.index("--resources") + 1]) == {"magi_node:jetson": 1000}

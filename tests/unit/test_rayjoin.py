import json

import pytest

from services.agent.rayjoin import RAY_HEAD_ID, RAY_WORKER_ID, own_specs, ray_head_spec, ray_worker_spec
from shared.config import load_settings
from shared.errors import BadRequest

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def token(tmp_path, monkeypatch):
    path = tmp_path / "ray-token"
    path.write_text("0123456789abcdef\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    return path


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
    assert spec.env["RAY_AUTH_MODE"] == "token"
    assert cmd[cmd.index("--node-manager-port") + 1] == "6381" and cmd[cmd.index("--max-worker-port") + 1] == "10099"


def test_head_command_on_the_head_node():
    settings = load_settings({"MAGI_RAY_HEAD_PORT": "6380", "MAGI_CLUSTER_ADDRESS": "10.0.0.1"})
    [spec] = own_specs(settings, "melchior")
    assert spec.instance_id == RAY_HEAD_ID and "--head" in spec.command and "--include-dashboard=false" in spec.command
    assert spec.command[spec.command.index("--port") + 1] == "6380"
    assert ray_head_spec(load_settings({}), "x") is None


def test_no_ray_without_its_token(token, monkeypatch):
    token.write_text("")
    with pytest.raises(BadRequest, match="token"):
        own_specs(load_settings({"MAGI_RAY_JOIN": "10.0.0.1:6380", "MAGI_CLUSTER_ADDRESS": "10.0.0.7"}), "n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token.parent / "missing"))
    monkeypatch.setenv("HOME", str(token.parent))
    with pytest.raises(BadRequest, match="token"):
        own_specs(load_settings({"MAGI_RAY_HEAD_PORT": "6380", "MAGI_CLUSTER_ADDRESS": "10.0.0.7"}), "n")


@pytest.mark.parametrize("address", ["0.0.0.0", "8.8.8.8", "melchior", ""])
def test_ray_never_binds_a_wildcard_or_public_address(address):
    with pytest.raises(BadRequest) as caught:
        own_specs(load_settings({"MAGI_RAY_JOIN": "10.0.0.1:6380", "MAGI_CLUSTER_ADDRESS": address or " "}), "n")
    assert caught.value.field == "cluster_address"

"""deploy/systemd's units pass `systemd-analyze verify` and carry the hardening the README promises."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                 reason="needs systemd-analyze (Debian's systemd package)")]

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
LONG_RUNNING = ("magi-agent.service", "magi-nats.service", "magi-service@.service")
HARDENING = {"NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
             "StateDirectory": "magi", "User": "magi"}


def _service_section(unit: Path) -> dict[str, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    seen: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():  # repeated keys (LoadCredential=) are kept, unlike configparser's
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            seen.setdefault(key, []).append(value)
    return seen


@pytest.fixture
def installed(tmp_path) -> Path:
    """The units as installed on a node, with /opt/magi pointing at this checkout (its .venv exists)."""
    shutil.copytree(UNITS, tmp_path / "units")
    for unit in (tmp_path / "units").rglob("*.service"):
        text = unit.read_text().replace("/opt/magi", str(REPO))
        if not shutil.which("nft"):
            text = text.replace("/usr/sbin/nft", shutil.which("true"))
        unit.write_text(text)
    return tmp_path / "units"


@pytest.mark.parametrize("unit", ["magi-agent.service", "magi-nats.service", "magi-firewall.service",
                                  "magi-service@scheduler.service", "magi-service@inference.service",
                                  "magi-service@gateway.service"])
def test_unit_verifies_cleanly(installed, unit):
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", unit], cwd=installed, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("unit", LONG_RUNNING)
def test_long_running_units_are_hardened(unit):
    seen = _service_section(UNITS / unit)
    for key, value in HARDENING.items():
        assert seen.get(key) == [value], (unit, key, seen.get(key))


def test_secrets_arrive_as_credentials_never_in_the_environment():
    agent, service = _service_section(UNITS / "magi-agent.service"), _service_section(UNITS / "magi-service@.service")
    assert "nats.nk:/etc/magi/credentials/agent.nk" in agent["LoadCredential"]
    assert service["LoadCredential"] == ["nats.nk:/etc/magi/credentials/%i.nk"]
    drop_in = (UNITS / "magi-service@inference.service.d" / "ray.conf").read_text()
    assert "LoadCredential=ray-token:" in drop_in  # only the inference service gets Ray's token
    gateway = _service_section(UNITS / "magi-service@gateway.service.d" / "http.conf")
    assert gateway["LoadCredential"] == ["gateway-key.pem:/etc/magi/credentials/gateway-key.pem",
                                         "api_keys:/etc/magi/credentials/api_keys"]
    assert gateway["Environment"] == ["MAGI_HTTP_TLS_KEY=%d/gateway-key.pem", "MAGI_API_KEYS_FILE=%d/api_keys"]
    assert agent["Type"] == ["notify"] and agent["WatchdogSec"] and service["Type"] == ["notify"]
    example = (REPO / "deploy" / "magi.env.example").read_text().splitlines()
    settings = [line.split("=", 1)[0] for line in example if line and not line.startswith("#")]
    assert not [s for s in settings if s.endswith(("_PASS", "_CREDS", "_TOKEN", "_TOKEN_PATH"))], settings

"""Nothing of ours listens beyond loopback (Ray binds every interface unless confined)."""

import ipaddress
from urllib.parse import urlparse

import psutil
import pytest

from magi.procs import process_tree

pytestmark = pytest.mark.integration


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # Ray's gRPC servers listen on ::ffff:127.0.0.1
    return ip.is_loopback


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("::ffff:10.0.0.1", False),
])
def test_loopback_classification(address, expected):
    assert is_loopback(address) is expected


def test_every_listener_of_the_stack_is_on_loopback(magi_stack):
    ours = {p.pid for c in magi_stack.components for p in process_tree(c.pid)}
    assert len(ours) > len(magi_stack.components), "expected Ray's processes under the inference service"
    listeners = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listeners, "the stack should be listening somewhere"
    exposed = [(c.pid, c.laddr.ip, c.laddr.port) for c in listeners if not is_loopback(c.laddr.ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # The gateway's HTTP API is one of them, on loopback.
    assert urlparse(magi_stack.http_url).port in {c.laddr.port for c in listeners}

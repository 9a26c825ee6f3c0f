"""A shard's RPC server has no authentication: it binds one specific address unless told otherwise."""

import pytest

from services.inference import rpc
from shared.errors import BadRequest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "  "])
def test_any_address_is_refused_by_default(host):
    with pytest.raises(BadRequest) as caught:
        rpc.bind_host(host)
    assert caught.value.field == "rpc_host"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_any_address_binds_every_ipv4_interface_when_allowed(host):
    assert rpc.bind_host(host, allow_any_address=True) == "0.0.0.0"


def test_specific_addresses_pass_and_names_resolve():
    assert rpc.bind_host("127.0.0.1") == "127.0.0.1"
    assert rpc.bind_host("10.1.2.3") == "10.1.2.3"
    assert rpc.bind_host("localhost") == "127.0.0.1"


@pytest.mark.parametrize("host", ["::1", "fe80::1", "no-such-host.invalid", "8.8.8.8", "203.0.113.300"])
def test_addresses_llama_cpp_cannot_bind_are_refused(host):
    with pytest.raises(BadRequest) as caught:
        rpc.bind_host(host)
    assert caught.value.field == "rpc_host"


def test_the_server_refuses_before_touching_llama_cpp():
    # No server starts (the call would block): the address check comes first.
    with pytest.raises(BadRequest) as caught:
        rpc.start_rpc_server("0.0.0.0:50052", n_threads=1)
    assert caught.value.field == "rpc_host"


@pytest.mark.parametrize("endpoint", ["127.0.0.1", "127.0.0.1:", ":50052", "127.0.0.1:0", "127.0.0.1:70000", "h:x"])
def test_malformed_endpoints_are_bad_requests(endpoint):
    with pytest.raises(BadRequest):
        rpc.parse_endpoint(endpoint)


def test_tensor_split_is_even_without_memory_figures(monkeypatch):
    monkeypatch.setattr(rpc, "free_memory", lambda device: 0)
    assert rpc.tensor_split_for([1, 2]) == [0.5, 0.5]
    monkeypatch.setattr(rpc, "free_memory", lambda device: {1: 3 << 30, 2: 1 << 30}[device])
    assert rpc.tensor_split_for([1, 2]) == [0.75, 0.25]


def test_devices_array_is_null_terminated():
    array = rpc.devices_array([11, 22])
    assert [array[0], array[1], array[2]] == [11, 22, None]


def test_no_or_repeated_shards_are_bad_requests():
    for endpoints in ([], ["127.0.0.1:50052", "127.0.0.1:50052"]):
        with pytest.raises(BadRequest) as caught:
            rpc.add_rpc_devices(endpoints)
        assert caught.value.field == "rpc_servers"


def test_a_public_address_is_refused_unless_allowed():
    with pytest.raises(BadRequest, match="public address"):
        rpc.bind_host("8.8.8.8")
    assert rpc.bind_host("8.8.8.8", allow_any_address=True) == "8.8.8.8"


def test_shard_ports_come_from_the_configured_range(monkeypatch):
    from services.inference.shard import free_port
    from shared.config import port_range

    monkeypatch.setenv("MAGI_RPC_PORTS", "50110-50119")
    assert all(50110 <= free_port("127.0.0.1") <= 50119 for _ in range(20))
    for bad in ("x", "50200-50100", "80-90"):
        with pytest.raises(BadRequest):
            port_range(bad)

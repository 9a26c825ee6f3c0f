"""`magi up --tls`: the local bus requires TLS, clients find the CA under MAGI_HOME, and it stays on."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from magi import stack
from magi.procs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _plaintext_hello(port: int) -> tuple[dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        info = json.loads(sock.makefile("rb").readline()[5:])
        sock.sendall(b'CONNECT {"verbose":false,"tls_required":false}\r\nPING\r\n')
        return info, sock.recv(300)


def test_tls_stack_refuses_plaintext_and_serves_clients_with_the_ca(tmp_path):
    cfg = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=(), tls=True)
    state = asyncio.run(stack.up(cfg))
    try:
        assert (tmp_path / "secrets" / "tls" / "ca.pem").exists()
        info, said = _plaintext_hello(cfg.nats_port)
        assert info["tls_required"] is True and b"PONG" not in said

        async def echo(msg) -> None:
            await msg.respond(msg.data)

        async def admin_round_trip() -> bytes:
            nc = await stack.connect_as(tmp_path, state.nats_url, "admin")  # TLS from the CA under the home
            try:
                await nc.subscribe("t.echo", cb=echo)
                return (await nc.request("t.echo", b"over tls", timeout=5)).data
            finally:
                await nc.close()

        assert asyncio.run(admin_round_trip()) == b"over tls"
    finally:
        stack.down(tmp_path)
    again = stack.StackConfig(home=tmp_path, nats_port=free_port(), redis_port=free_port(), services=())
    asyncio.run(stack.up(again))  # no --tls this time: TLS stays on for this home
    try:
        assert _plaintext_hello(again.nats_port)[0]["tls_required"] is True
    finally:
        stack.down(tmp_path)

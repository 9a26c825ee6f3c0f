"""The gateway process: an HTTP server (uvicorn, in this process's event loop) for the OpenAI-compatible
API, and a NATS micro service (`magi-gateway`, `magi.gateway.info`) registered only once HTTP listens,
so `$SRV.PING` answering means the API is up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from protos.common import Empty
from protos.gateway import GatewayInfo
from services.gateway.app import Gateway
from services.gateway.keys import ApiKeys
from shared.config import Settings
from shared.errors import StackError
from shared.service import MagiService, RequestContext

VERSION = "0.1.0"
log = logging.getLogger("magi.gateway")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service's runner owns SIGTERM/SIGINT."""

    def capture_signals(self):
        return contextlib.nullcontext()


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so, and
    # with Nagle on, a reply written in two parts waits for the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StackError(f"cannot listen on {host}:{port} ({exc.strerror}); set MAGI_HTTP_PORT") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def base_url(host: str, port: int, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}/v1"


def tls_options(settings: Settings) -> dict[str, str]:
    """uvicorn's TLS settings: both files or neither (half a pair is a configuration error, not plain HTTP)."""
    cert, key = settings.http_tls_cert, settings.http_tls_key
    if bool(cert) != bool(key):
        raise StackError("set both MAGI_HTTP_TLS_CERT and MAGI_HTTP_TLS_KEY for HTTPS, or neither")
    return {"ssl_certfile": cert, "ssl_keyfile": key} if cert else {}


async def build(settings: Settings):
    service = MagiService("magi-gateway", VERSION, "OpenAI-compatible HTTP API over the bus", settings)
    nc = await service.connect()
    gateway = Gateway(settings, nc, ApiKeys(settings.api_keys_path()))
    await gateway.dashboard.start()
    await gateway.heartbeats.start()
    tls = tls_options(settings)
    sock = listen(settings.http_host, settings.http_port)
    url = base_url(settings.http_host, sock.getsockname()[1], bool(tls))
    config = uvicorn.Config(gateway.app(), log_config=None, access_log=False, lifespan="off", server_header=False,
                            http="httptools", timeout_graceful_shutdown=5, timeout_keep_alive=30, **tls)
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # listening: only then does the micro service (readiness) register
        if serving.done():
            serving.result()
            raise StackError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    log.info("HTTP API listening", extra={"url": url, "keys_file": str(settings.api_keys_path())})

    async def info(_req: Empty, _ctx: RequestContext) -> GatewayInfo:
        c = gateway.counters
        return GatewayInfo(url=url, in_flight=c.in_flight, limit=gateway.limit, served=c.served, rejected=c.rejected,
                           streams=c.streams, cancelled=c.cancelled)

    service.endpoint("magi.gateway.info", Empty, info)

    async def stop_http() -> None:
        """Before the bus closes: stop accepting, let requests in flight finish over the bus (uvicorn's
        graceful timeout, then it cancels them), wait for the cancels those send."""
        await gateway.dashboard.close()  # ends the dashboards' endless feeds, so they do not hold the exit
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)
        await gateway.close()

    async def cleanup() -> None:
        sock.close()

    return service, cleanup, stop_http

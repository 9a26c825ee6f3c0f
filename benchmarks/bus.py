"""Round trip of a trivial MAGI endpoint vs a raw nats-py request-reply on the same server; and of the same
endpoint on a server with TLS and nkey credentials vs one with neither."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from magi import stack
from magi.procs import free_port, stop_tree, wait_tcp
from shared.config import Settings
from shared.service import MagiService


class Echo(msgspec.Struct, kw_only=True):
    text: str = ""


async def _echo(req: Echo, _ctx) -> Echo:
    return req


async def _raw_echo(msg) -> None:
    await msg.respond(msg.data)


async def _latencies(nc, subject: str, payload: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await nc.request(subject, payload, timeout=5)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def _echo_service(settings: Settings) -> MagiService:
    # Runs as the admin identity: the bench's echo subjects belong to no role.
    service = MagiService("magi-bench", "0.1.0", "echo for the bus benchmark", settings, identity="admin")
    service.endpoint("magi.bench.echo", Echo, _echo)
    await service.connect()
    await service.start()
    return service


async def measure_hop(home: str, nats_url: str, n: int = 2000) -> dict[str, float]:
    service = await _echo_service(Settings(nats_url=nats_url, home=home))
    raw = await stack.connect_as(home, nats_url)
    sub = await raw.subscribe("bench.raw", cb=_raw_echo)
    client = await stack.connect_as(home, nats_url)
    payload = msgspec.json.encode(Echo(text="ping"))
    try:
        await _latencies(client, "bench.raw", payload, 200)  # warm both paths
        await _latencies(client, "magi.bench.echo", payload, 200)
        raw_ms, magi_ms = [], []
        for _ in range(4):  # interleave so drift hits both sides alike
            raw_ms += await _latencies(client, "bench.raw", payload, n // 4)
            magi_ms += await _latencies(client, "magi.bench.echo", payload, n // 4)
    finally:
        await sub.unsubscribe()
        await raw.close()
        await client.close()
        await service.close()
    return {
        "bus.raw_rtt_ms.p50": round(_pct(raw_ms, 50), 4),
        "bus.magi_rtt_ms.p50": round(_pct(magi_ms, 50), 4),
        "bus.magi_rtt_ms.p99": round(_pct(magi_ms, 99), 4),
        "bus.hop_overhead_ms.p50": round(_pct(magi_ms, 50) - _pct(raw_ms, 50), 4),
    }


async def _endpoint_rtts(home: str, nats_url: str, rounds: int, n: int) -> list[list[float]]:
    """`rounds` batches of `n` round trips to the echo endpoint, each batch's latencies in ms."""
    service = await _echo_service(Settings(nats_url=nats_url, home=home))
    client = await stack.connect_as(home, nats_url)
    payload = msgspec.json.encode(Echo(text="ping"))
    try:
        await _latencies(client, "magi.bench.echo", payload, 200)
        return [await _latencies(client, "magi.bench.echo", payload, n) for _ in range(rounds)]
    finally:
        await client.close()
        await service.close()


def _plain_server(home: Path) -> tuple[int, object]:
    """The baseline only: a nats-server with no TLS and no authorization (never what MAGI runs)."""
    port = free_port()
    conf = home / "plain.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\n')
    proc = stack.spawn_nats(home, conf, "plain-nats")
    wait_tcp(port, 15, proc)
    return port, proc


async def measure_auth_overhead(n: int = 2000) -> dict[str, float]:
    """The same MAGI endpoint behind TLS + nkeys (MAGI's own config) vs behind neither, interleaved."""
    with tempfile.TemporaryDirectory(prefix="magi-bench-tls-") as tmp:
        home = Path(tmp)
        cfg = stack.StackConfig(home=home / "secure", nats_port=free_port(), services=(), tls=True)
        cfg.home.mkdir()
        secure = stack.start_nats(cfg)
        port, plain = _plain_server(home)
        try:
            secure_ms, plain_ms = [], []
            for _ in range(4):  # alternate, so drift on the machine hits both sides alike
                plain_ms += (await _endpoint_rtts(str(home), f"nats://127.0.0.1:{port}", 1, n // 4))[0]
                secure_ms += (await _endpoint_rtts(str(cfg.home), cfg.nats_url, 1, n // 4))[0]
        finally:
            for proc in (secure, plain):
                stop_tree(proc.pid, grace=5)
    return {
        "bus.plain_rtt_ms.p50": round(_pct(plain_ms, 50), 4),
        "bus.tls_auth_rtt_ms.p50": round(_pct(secure_ms, 50), 4),
        "bus.tls_auth_overhead_ms.p50": round(_pct(secure_ms, 50) - _pct(plain_ms, 50), 4),
    }


if __name__ == "__main__":
    print(asyncio.run(measure_auth_overhead()))

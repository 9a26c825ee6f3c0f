"""Round trip of a trivial MAGI endpoint vs a raw nats-py request-reply on the same server."""

from __future__ import annotations

import statistics
import time

import msgspec
import nats

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


async def measure_hop(nats_url: str, n: int = 2000) -> dict[str, float]:
    settings = Settings(nats_url=nats_url)
    service = MagiService("magi-bench", "0.1.0", "echo for the bus benchmark", settings)
    service.endpoint("magi.bench.echo", Echo, _echo)
    await service.connect()
    await service.start()
    raw = await nats.connect(nats_url)
    sub = await raw.subscribe("bench.raw", cb=_raw_echo)
    client = await nats.connect(nats_url)
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

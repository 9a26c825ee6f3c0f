"""The dashboard's HTTP side against the session stack's real gateway: no cluster data without the key,
the login cookie, and the server-sent feed (snapshot, then a mission's events as they happen)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from urllib.parse import urlparse

import pytest

from magi.procs import free_port, stop_tree
from protos.mission import MissionReply, MissionRequest
from shared import bus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "smollm2-135m"


@pytest.fixture
def base(gateway_url) -> tuple[str, int]:
    url = urlparse(gateway_url)
    return url.hostname, url.port


def _call(base, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(*base, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def _login(base, key: str) -> tuple[int, str]:
    status, response, _ = _call(base, "POST", "/login", json.dumps({"key": key}).encode(),
                                {"Content-Type": "application/json"})
    return status, response.getheader("set-cookie") or ""


def _cookie(set_cookie: str) -> str:
    return set_cookie.split(";")[0]


def test_the_page_is_served_but_cluster_data_needs_the_key(base, api_key):
    status, response, page = _call(base, "GET", "/")
    assert status == 200 and b"/static/dashboard.js" in page and b"testnode" not in page
    assert "script-src 'self'" in response.getheader("content-security-policy")
    assert _call(base, "GET", "/static/dashboard.js")[0] == 200
    assert _call(base, "GET", "/static/../app.py")[0] == 404
    for path in ("/api/snapshot", "/events", "/api/session"):
        assert _call(base, "GET", path)[0] == 401, path
        assert _call(base, "GET", path, headers={"Cookie": "magi_dashboard=made-up"})[0] == 401, path
    assert _login(base, "not-the-key")[0] == 401
    # Only JSON logs in: a cross-site HTML form cannot send it.
    status, _, _ = _call(base, "POST", "/login", f"key={api_key}".encode(),
                         {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415


def test_login_sets_a_session_cookie_that_reads_the_cluster_until_logout(base, api_key):
    status, set_cookie = _login(base, api_key)
    assert status == 200
    flags = {part.strip().lower() for part in set_cookie.split(";")}
    assert "httponly" in flags and "samesite=strict" in flags and api_key not in set_cookie
    cookie = {"Cookie": _cookie(set_cookie)}
    status, _, body = _call(base, "GET", "/api/snapshot", headers=cookie)
    assert status == 200
    snapshot = json.loads(body)
    node = next(n for n in snapshot["nodes"] if n["name"] == "testnode")
    assert node["status"] == "HEALTHY" and node["ram_total_gb"] > 0 and node["cpu_count"] > 0
    model = next(m for m in snapshot["models"] if m["name"] == MODEL)
    assert model["replicas"] and all(r["node"] == "testnode" for r in model["replicas"])
    # The API's bearer header reads it too (curl, scripts).
    assert _call(base, "GET", "/api/snapshot", headers={"Authorization": f"Bearer {api_key}"})[0] == 200
    assert _call(base, "POST", "/logout", headers=cookie)[0] == 200
    assert _call(base, "GET", "/api/snapshot", headers=cookie)[0] == 401


class _Feed:
    """The SSE feed read as a browser's EventSource reads it, in a thread (http.client blocks)."""

    def __init__(self, base, cookie: str) -> None:
        self.conn = http.client.HTTPConnection(*base, timeout=60)
        self.conn.request("GET", "/events", headers={"Cookie": cookie, "Accept": "text/event-stream"})
        self.response = self.conn.getresponse()

    def next(self) -> dict:
        data = []
        while True:
            line = self.response.fp.readline().decode()
            if line in ("\n", "\r\n", ""):
                if data:
                    return json.loads("".join(data))
                if line == "":
                    raise EOFError("the feed ended")
                continue
            if line.startswith("data: "):
                data.append(line[6:].rstrip("\n"))

    def close(self) -> None:
        self.conn.close()


async def test_the_feed_sends_a_snapshot_then_a_mission_as_it_happens(base, api_key, nc):
    _, set_cookie = _login(base, api_key)
    feed = await asyncio.to_thread(_Feed, base, _cookie(set_cookie))
    try:
        assert feed.response.status == 200
        assert feed.response.getheader("content-type").startswith("text/event-stream")
        first = await asyncio.to_thread(feed.next)
        assert first["type"] == "snapshot" and any(n["name"] == "testnode" for n in first["nodes"])

        mission_id = f"feed-{uuid.uuid4().hex[:12]}"
        mission = MissionRequest(prompt="Name a fruit.", variations=["in one word", "in one line"], max_tokens=12,
                                 consensus="longest", mission_id=mission_id)
        run = asyncio.create_task(bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=150))
        seen: list[dict] = []
        kinds: set[str] = set()
        while "decided" not in [e["type"] for e in seen]:
            event = await asyncio.wait_for(asyncio.to_thread(feed.next), 150)
            kinds.add(event["type"])
            if event["type"] == "mission" and event["event"]["mission_id"] == mission_id:
                seen.append(event["event"])
        reply = await run
        assert [e["type"] for e in seen] == ["started", "clone", "clone", "decided"]
        assert sorted(e["clone_id"] for e in seen if e["type"] == "clone") == ["var0", "var1"]
        assert seen[-1]["answer"] == reply.consensus.answer
        # Heartbeats reach the feed too (at most once a second), and the model list while someone watches.
        for _ in range(30):
            if {"nodes", "models"} <= kinds:
                break
            kinds.add((await asyncio.wait_for(asyncio.to_thread(feed.next), 30))["type"])
        assert {"nodes", "models"} <= kinds
    finally:
        feed.close()



@contextlib.contextmanager
def _gateway_started_now(magi_stack):
    """A gateway started after missions ran (as after a restart), on the same bus."""
    port = free_port()
    env = dict(os.environ, MAGI_NATS_URL=magi_stack.nats_url, MAGI_HOME=magi_stack.home, MAGI_HTTP_PORT=str(port),
               MAGI_LOG_LEVEL="WARNING")
    env.pop("MAGI_NATS_CREDS", None)
    env.pop("MAGI_API_KEYS_FILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if _call(("127.0.0.1", port), "GET", "/health")[0] == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "the second gateway did not start"
            time.sleep(0.1)
        yield "127.0.0.1", port
    finally:
        stop_tree(proc.pid, grace=10)


async def test_a_gateway_started_later_reads_recent_missions_back_from_the_graph(nc, api_key, magi_stack):
    mission = MissionRequest(prompt="Name a river.", variations=["in one word", "in one line"], max_tokens=12,
                             consensus="medoid", mission_id=f"seeded-{uuid.uuid4().hex[:12]}")
    reply = await bus.request(nc, "magi.mission.run", mission, MissionReply, timeout=150)
    with _gateway_started_now(magi_stack) as base:
        _, set_cookie = _login(base, api_key)
        cookie = {"Cookie": _cookie(set_cookie)}
        found = None
        for _ in range(100):  # the history is read in the background after start-up
            status, _, body = _call(base, "GET", "/api/snapshot", headers=cookie)
            assert status == 200
            found = next((m for m in json.loads(body)["missions"] if m["mission_id"] == reply.mission_id), None)
            if found:
                break
            await asyncio.sleep(0.2)
        assert found, "the mission run before the gateway started is not in its history"
        assert found["state"] == "decided" and found["consensus"]["answer"] == reply.consensus.answer
        assert found["consensus"]["strategy"] == "medoid" and found["at"] > 0
        assert sorted(c["clone_id"] for c in found["clones"]) == ["var0", "var1"]

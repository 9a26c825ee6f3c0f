"""What the dashboard shows, kept by the gateway from the bus and fanned out to every browser.

One set of bus subscriptions serves all browsers: heartbeats and mission events are received once
and put on each connected browser's own bounded queue (`Hub`). A browser that reads too slowly has
its queue dropped and gets a fresh snapshot when it catches up, so a stalled tab costs a bounded
amount of memory and still ends up showing the truth.

- Nodes: the newest heartbeat of each node (sent to browsers at most once a second), with the
  scheduler's view of its health (`magi.sched.nodes`: a node that stopped beating is UNAVAILABLE).
- Models, replicas and their load (`magi.infer.models`) and the placement report (`magi.sched.report`):
  polled only while a browser is connected, and sent only when they changed.
- Missions: the last `KEEP_MISSIONS`, built from `magi.mission.events.>`; at start-up the recent ones
  are read back from the mission graph (each node's votes in `magi.consensus.history`, each mission's
  stored result through `magi.mission.get`), so the history survives a gateway restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from datetime import datetime

import msgspec
from nats.aio.client import Client

from protos.common import Empty
from protos.consensus import HistoryReply, HistoryRequest
from protos.infer import ModelsReply
from protos.mission import (
    ANSWER_CHARS,
    EVENTS_PREFIX,
    EXCERPT_CHARS,
    MissionClone,
    MissionDecided,
    MissionEvent,
    MissionFailed,
    MissionGet,
    MissionReply,
    MissionStarted,
)
from protos.node import ClusterReport, Heartbeat, NodesReply
from services.gateway.heartbeats import Heartbeats
from shared import bus
from shared.errors import MagiError

log = logging.getLogger("magi.gateway.dashboard")

KEEP_MISSIONS = 30
QUEUE_EVENTS = 256  # per browser: beyond this it is lagging, and gets a snapshot instead of the backlog
NODES_EVERY_S = 1.0  # heartbeats are forwarded at most this often
MODELS_EVERY_S = 2.0
STATUS_EVERY_S = 5.0  # scheduler's node health and the placement report
ASK_TIMEOUT_S = 3.0
SEED_MISSIONS = 10

_encoder = msgspec.json.Encoder()
_event = msgspec.json.Decoder(MissionEvent)


def sse(obj: dict) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


class Browser:
    """One connected browser: a bounded queue of encoded events, and whether it fell behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_EVENTS)
        self.lagged = False
        self.dropped = 0


class Hub:
    def __init__(self) -> None:
        self.browsers: set[Browser] = set()

    def add(self) -> Browser:
        browser = Browser()
        self.browsers.add(browser)
        return browser

    def remove(self, browser: Browser) -> None:
        self.browsers.discard(browser)

    def close(self) -> None:
        """Every feed ends (an empty event is the end)."""
        for browser in self.browsers:
            while not browser.queue.empty():
                browser.queue.get_nowait()
            browser.queue.put_nowait(b"")
        self.browsers.clear()

    def send(self, event: bytes) -> None:
        for browser in self.browsers:
            if browser.lagged:
                browser.dropped += 1
                continue
            try:
                browser.queue.put_nowait(event)
            except asyncio.QueueFull:  # drop its backlog: it reads a snapshot next, not stale events
                browser.dropped += browser.queue.qsize() + 1
                browser.lagged = True
                while not browser.queue.empty():
                    browser.queue.get_nowait()


def _iso_to_epoch(text: str) -> float:
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text).timestamp()  # 3.11 reads "Z" and nanoseconds
    return 0.0


def apply_event(missions: OrderedDict[str, dict], event: MissionEvent, keep: int = KEEP_MISSIONS) -> dict:
    """Fold one mission event into the missions kept (the browser's script folds them the same way)."""
    mission = missions.get(event.mission_id)
    if mission is None or isinstance(event, MissionStarted):
        mission = {"mission_id": event.mission_id, "prompt": "", "strategy": "", "planned": [], "clones": [],
                   "state": "running", "at": event.at, "consensus": None, "error": ""}
        missions[event.mission_id] = mission
        missions.move_to_end(event.mission_id)
        while len(missions) > keep:
            missions.popitem(last=False)
    if isinstance(event, MissionStarted):
        mission.update(prompt=event.prompt, strategy=event.strategy,
                       planned=[msgspec.to_builtins(c) for c in event.clones])
    elif isinstance(event, MissionClone):
        clone = msgspec.to_builtins(event)
        mission["clones"] = [c for c in mission["clones"] if c["clone_id"] != event.clone_id] + [clone]
    elif isinstance(event, MissionDecided):
        mission.update(state="decided", strategy=event.strategy or mission["strategy"],
                       consensus=msgspec.to_builtins(event))
    elif isinstance(event, MissionFailed):
        mission.update(state="failed", error=f"{event.code}: {event.error}")
    return mission


def _from_reply(reply: MissionReply, at: float) -> dict:
    """A mission read back from its stored result (its prompt is not stored there)."""
    s = reply.consensus
    return {"mission_id": reply.mission_id, "prompt": "", "strategy": s.strategy, "state": "decided", "at": at,
            "planned": [{"clone_id": c.clone_id, "role": c.role, "variation": c.variation} for c in reply.clones],
            "clones": [{"clone_id": c.clone_id, "role": c.role, "variation": c.variation, "model": c.model,
                        "node": c.node, "replica": c.replica, "latency_ms": c.latency_ms, "ok": c.ok,
                        "text": c.text[:EXCERPT_CHARS], "error": c.error or ""} for c in reply.clones],
            "consensus": {"consensus_id": s.id, "strategy": s.strategy, "answer": s.answer[:ANSWER_CHARS],
                          "agreement": s.agreement, "votes": s.votes, "winner": s.winner, "cited": list(s.cited),
                          "total_ms": reply.timings.total_ms},
            "error": ""}


class ClusterView:
    def __init__(self, nc: Client, heartbeats: Heartbeats) -> None:
        self.nc = nc
        self.hub = Hub()
        self.heartbeats = heartbeats.latest  # node -> (newest heartbeat, received at), shared with `/metrics`
        heartbeats.listeners.append(self._on_heartbeat)
        self.status: dict[str, tuple[str, float | None]] = {}  # node -> the scheduler's (status, last seen s)
        self.models: list = []
        self.report: dict | None = None
        self.missions: OrderedDict[str, dict] = OrderedDict()
        self.problems: dict[str, str] = {}  # what could not be read, shown as a banner
        self.polled = 0.0  # when models and status were last read (monotonic)
        self._nodes_dirty = False
        self._encoded: dict[str, bytes] = {}  # last encoding sent per kind, to send only changes
        self._subs: list = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._subs = [await self.nc.subscribe(f"{EVENTS_PREFIX}.>", cb=self._on_mission_event)]
        self._tasks = [asyncio.create_task(self._ticker(), name="dashboard-ticker"),
                       asyncio.create_task(self._seed_history(), name="dashboard-history")]

    async def close(self) -> None:
        self.hub.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # ---- from the bus ----------------------------------------------------------------------------

    def _on_heartbeat(self, _hb: Heartbeat) -> None:
        self._nodes_dirty = True

    async def _on_mission_event(self, msg) -> None:
        try:
            event = _event.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable mission event", extra={"subject": msg.subject})
            return
        if not event.mission_id:
            return
        apply_event(self.missions, event)
        self.hub.send(sse({"type": "mission", "event": msgspec.to_builtins(event)}))

    async def _ask(self, what: str, subject: str, payload, reply_type):
        try:
            reply = await bus.request(self.nc, subject, payload, reply_type, timeout=ASK_TIMEOUT_S)
        except MagiError as exc:
            self.problems[what] = f"{subject}: {exc.code} {exc.message}"[:300]
            return None
        self.problems.pop(what, None)
        return reply

    async def refresh_models(self) -> None:
        reply = await self._ask("models", "magi.infer.models", Empty(), ModelsReply)
        if reply is not None:
            self.models = msgspec.to_builtins(reply.models)

    async def refresh_status(self) -> None:
        nodes, report = await asyncio.gather(self._ask("nodes", "magi.sched.nodes", Empty(), NodesReply),
                                             self._ask("report", "magi.sched.report", Empty(), ClusterReport))
        if nodes is not None:
            fresh = {n.name: (n.status, n.last_seen_s) for n in nodes.nodes}
            for n in nodes.nodes:  # a node heard by the scheduler before the gateway started
                if n.name not in self.heartbeats and n.heartbeat.node:
                    self.heartbeats[n.name] = (n.heartbeat, time.monotonic() - (n.last_seen_s or 0.0))
            if fresh != self.status:
                self.status, self._nodes_dirty = fresh, True
        if report is not None:
            self.report = msgspec.to_builtins(report)

    # ---- to the browsers -------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        now = time.monotonic()
        out = []
        for name in sorted(set(self.heartbeats) | set(self.status)):
            hb, received = self.heartbeats.get(name, (None, now))
            status, last_seen = self.status.get(name, (hb.health if hb else "UNAVAILABLE", None))
            node = msgspec.to_builtins(hb) if hb else {"node": name}
            node.update(name=name, status=status, heard_s=round(now - received, 1) if hb else None)
            out.append(node)
        return out

    def snapshot(self) -> dict:
        return {"type": "snapshot", "nodes": self.nodes(), "models": self.models, "report": self.report,
                "missions": list(self.missions.values()), "problems": self.problems}

    async def fresh_snapshot(self) -> dict:
        """A snapshot for a browser that just connected; read again what nobody polled lately."""
        if time.monotonic() - self.polled > MODELS_EVERY_S:
            await asyncio.gather(self.refresh_models(), self.refresh_status())
            self.polled = time.monotonic()
        return self.snapshot()

    def _send_if_changed(self, kind: str, obj: dict) -> None:
        encoded = sse(obj)
        if self._encoded.get(kind) != encoded:
            self._encoded[kind] = encoded
            self.hub.send(encoded)

    async def _ticker(self) -> None:
        """Heartbeats at most once a second; models and status polled only while someone watches."""
        last_models = last_status = 0.0
        while True:
            await asyncio.sleep(NODES_EVERY_S)
            if not self.hub.browsers:
                continue
            try:
                now = time.monotonic()
                if now - last_models >= MODELS_EVERY_S:
                    last_models = now
                    await self.refresh_models()
                    self.polled = time.monotonic()
                    self._send_if_changed("models", {"type": "models", "models": self.models,
                                                     "problems": self.problems})
                if now - last_status >= STATUS_EVERY_S:
                    last_status = now
                    await self.refresh_status()
                    self._send_if_changed("report", {"type": "report", "report": self.report,
                                                     "problems": self.problems})
                if self._nodes_dirty:
                    self._nodes_dirty = False
                    self.hub.send(sse({"type": "nodes", "nodes": self.nodes()}))
            except Exception as exc:  # a bad reply must not end the feed for everyone
                log.warning("dashboard refresh failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})

    async def _seed_history(self) -> None:
        """The latest missions from the mission graph, once, so a restarted gateway still shows history."""
        try:
            for _ in range(10):  # the scheduler may still be starting with the stack
                await self.refresh_status()
                if self.status:
                    break
                await asyncio.sleep(3.0)
            latest: dict[str, str] = {}  # mission id -> newest vote time
            for node in list(self.status):
                reply = await self._ask("history", "magi.consensus.history", HistoryRequest(node=node, k=60),
                                        HistoryReply)
                for c in reply.contributions if reply else []:
                    if c.mission_id and c.created_at > latest.get(c.mission_id, ""):
                        latest[c.mission_id] = c.created_at
            self.problems.pop("history", None)  # the graph is not the dashboard's to keep reporting
            wanted = sorted(latest, key=latest.get, reverse=True)[:SEED_MISSIONS]
            replies = await asyncio.gather(*(bus.request(self.nc, "magi.mission.get", MissionGet(mission_id=m),
                                                         MissionReply, timeout=ASK_TIMEOUT_S) for m in wanted),
                                           return_exceptions=True)
            seeded = [_from_reply(r, _iso_to_epoch(latest[m])) for m, r in zip(wanted, replies)
                      if isinstance(r, MissionReply)]
            older = OrderedDict((m["mission_id"], m) for m in sorted(seeded, key=lambda m: m["at"])
                                if m["mission_id"] not in self.missions)
            older.update(self.missions)  # live events since start-up stay newest
            while len(older) > KEEP_MISSIONS:
                older.popitem(last=False)
            self.missions = older
            log.info("dashboard history read", extra={"missions": len(seeded)})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # history is a nicety: the live view works without it
            log.warning("dashboard history not read", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})

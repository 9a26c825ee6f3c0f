"""The live dashboard at `/`: a static page, a login, and one server-sent event feed per browser.

Auth, secure by default: the page and its script carry no cluster data and are served to anyone; every
byte of cluster data (`/events`, `/api/snapshot`) needs either the API's bearer key in the
`Authorization` header (curl) or a session cookie. A browser's EventSource cannot send headers, so the
page asks for the API key once and POSTs it as JSON to `/login`, which answers with a random session
token in an `HttpOnly; SameSite=Strict` cookie (`Secure` when the gateway speaks HTTPS). The key never
goes into a URL (it would end up in history and logs), the script never sees the cookie, and `/login`
takes only `application/json`, which a cross-site form cannot send. Sessions live in the gateway's
memory for `SESSION_TTL_S`; a key revoked from the keys file ends its sessions at once; a gateway
restart ends them all (log in again).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from importlib import resources

import msgspec
from nats.aio.client import Client
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway.cluster_view import ClusterView, sse
from services.gateway.heartbeats import Heartbeats
from services.gateway.keys import ApiKeys
from shared.config import Settings

log = logging.getLogger("magi.gateway.dashboard")

COOKIE = "magi_dashboard"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 1000
MAX_BROWSERS = 32  # feeds at once; more get 429
KEEPALIVE_S = 15.0  # a comment this often, so a vanished browser is noticed and proxies keep the stream
LOGIN_MAX_BYTES = 4096
STATIC = {  # file -> content type; read once from the package
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    # Nothing but this origin's own files: no inline script, so a string that slipped into the DOM as
    # markup still could not run.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_login = msgspec.json.Decoder(dict[str, str])


def _static_files() -> dict[str, bytes]:
    folder = resources.files("services.gateway").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC}


class Sessions:
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys
        self.by_token: dict[str, tuple[str, float]] = {}  # token -> (the key it was opened with, expiry)

    def open(self, key: str) -> str | None:
        if not key or not self.keys.check(f"Bearer {key}"):
            return None
        now = time.monotonic()
        self.by_token = {t: s for t, s in self.by_token.items() if s[1] > now}
        while len(self.by_token) >= MAX_SESSIONS:  # the oldest go first
            self.by_token.pop(next(iter(self.by_token)))
        token = secrets.token_urlsafe(32)
        self.by_token[token] = (key, now + SESSION_TTL_S)
        return token

    def close(self, token: str) -> None:
        self.by_token.pop(token, None)

    def allowed(self, request: Request) -> bool:
        header = request.headers.get("authorization")
        if header:
            return self.keys.check(header)
        session = self.by_token.get(request.cookies.get(COOKIE, ""))
        if session is None or session[1] <= time.monotonic():
            return False
        return self.keys.check(f"Bearer {session[0]}")  # a revoked key ends its sessions


def _json(obj: dict, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json",
                    headers=SECURITY_HEADERS)


def _unauthorized() -> Response:
    return _json({"error": {"message": "log in with the API key ($MAGI_HOME/secrets/api_key)", "type":
                            "invalid_request_error", "param": None, "code": "invalid_api_key"}}, 401)


class Feed:
    """One browser's event stream: a snapshot, then live events from its queue, until it goes away
    (its disconnect is listened for while streaming, so it leaves the fan-out at once)."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    async def __call__(self, scope, receive, send) -> None:
        browser = self.view.hub.add()
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
                   (b"x-accel-buffering", b"no")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            pump = asyncio.ensure_future(self._pump(browser, send))
            listen = asyncio.ensure_future(self._listen(receive))
            await asyncio.wait({pump, listen}, return_when=asyncio.FIRST_COMPLETED)
            for task in (pump, listen):
                task.cancel()
            await asyncio.gather(pump, listen, return_exceptions=True)
        finally:
            self.view.hub.remove(browser)

    async def _pump(self, browser, send) -> None:
        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await write(b"retry: 2000\n\n" + sse(await self.view.fresh_snapshot()))
        while True:
            if browser.lagged:  # it fell behind and its backlog was dropped: start it afresh
                browser.lagged = False
                await write(sse(self.view.snapshot()))
            try:
                event = await asyncio.wait_for(browser.queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                event = b": keepalive\n\n"
            if not event:  # the gateway is stopping
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await write(event)

    @staticmethod
    async def _listen(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


class Dashboard:
    def __init__(self, settings: Settings, nc: Client, keys: ApiKeys, heartbeats: Heartbeats) -> None:
        self.view = ClusterView(nc, heartbeats)
        self.sessions = Sessions(keys)
        self.secure_cookie = bool(settings.http_tls_cert)
        self.files = _static_files()

    async def start(self) -> None:
        await self.view.start()

    async def close(self) -> None:
        await self.view.close()

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/static/{name}", self.static, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/api/session", self.session, methods=["GET"]),
            Route("/api/snapshot", self.snapshot, methods=["GET"]),
            Route("/events", self.events, methods=["GET"]),
        ]

    async def page(self, request: Request) -> Response:
        return Response(self.files["index.html"], media_type=STATIC["index.html"], headers=SECURITY_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC or name == "index.html":
            return _json({"error": {"message": f"no file {name}", "type": "invalid_request_error", "param": None,
                                    "code": "not_found"}}, 404)
        return Response(self.files[name], media_type=STATIC[name], headers=SECURITY_HEADERS)

    async def login(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _json({"error": {"message": "send {\"key\": ...} as application/json", "type":
                                    "invalid_request_error", "param": None, "code": None}}, 415)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > LOGIN_MAX_BYTES:
                return _json({"error": {"message": "login body too large", "type": "invalid_request_error",
                                        "param": None, "code": None}}, 413)
        try:
            key = _login.decode(body).get("key", "").strip()
        except msgspec.DecodeError:
            key = ""
        token = self.sessions.open(key)
        if token is None:
            log.warning("dashboard login refused", extra={"client": request.client.host if request.client else ""})
            return _unauthorized()
        response = _json({"ok": True})
        response.set_cookie(COOKIE, token, max_age=SESSION_TTL_S, path="/", httponly=True, samesite="strict",
                            secure=self.secure_cookie)
        return response

    async def logout(self, request: Request) -> Response:
        self.sessions.close(request.cookies.get(COOKIE, ""))
        response = _json({"ok": True})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure_cookie)
        return response

    async def session(self, request: Request) -> Response:
        return _json({"ok": True}) if self.sessions.allowed(request) else _unauthorized()

    async def snapshot(self, request: Request) -> Response:
        if not self.sessions.allowed(request):
            return _unauthorized()
        return _json(await self.view.fresh_snapshot())

    async def events(self, request: Request):
        if not self.sessions.allowed(request):
            return _unauthorized()
        if len(self.view.hub.browsers) >= MAX_BROWSERS:
            return _json({"error": {"message": f"too many dashboards open (at most {MAX_BROWSERS})", "type":
                                    "rate_limit_error", "param": None, "code": None}}, 429)
        return Feed(self.view)

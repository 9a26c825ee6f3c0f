"""A Hugging Face Hub download endpoint on 127.0.0.1 for `magi models pull`'s tests (not a test module).

It speaks the part of the hub's protocol `huggingface_hub.hf_hub_download` uses for one file, as
huggingface_hub 2.x's file_download.py reads it: `HEAD|GET /{repo}/resolve/{revision}/{file}` answers an
LFS file with a 302 to a second origin (the hub's CDN) carrying `X-Repo-Commit`, `X-Linked-Etag` (the file's
SHA-256) and `X-Linked-Size`; the CDN serves the bytes with `Content-Length`. Errors carry the `X-Error-Code`
huggingface_hub turns into its exception types (RepoNotFound, RevisionNotFound, EntryNotFound), and a
private repo answers 401 without the right bearer token, as the hub does. Nothing here leaves loopback.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

CHUNK = 1 << 20


@dataclass
class Repo:
    files: dict[str, Path]
    commit: str  # "": answered without X-Repo-Commit, as a plain file server would
    token: str = ""  # a private repo: only this bearer token may read it
    gated: bool = False  # the hub refuses it until its terms are accepted
    status: int = 0  # the hub answers every request for it with this status (a hub in trouble: 503)


@dataclass
class LocalHub:
    repos: dict[str, Repo]
    corrupt: bool = False  # the CDN flips the first byte of every file it serves (same length)
    stall: bool = False  # the CDN sends the first chunk, then nothing until the hub is closed
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (origin, method, path)
    url: str = ""
    cdn_url: str = ""

    def __enter__(self) -> LocalHub:
        self._closing = threading.Event()
        self._servers = [_serve(self, self._hub), _serve(self, self._cdn)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _hub(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        repo_id, sep, rest = handler.path.partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo = self.repos.get(repo_id.strip("/"))
        auth = handler.headers.get("Authorization", "")
        if not sep or repo is None or (repo.token and not auth):
            return _reply(handler, 404 if repo is None else 401, {"X-Error-Code": "RepoNotFound"})
        if repo.token and auth != f"Bearer {repo.token}":
            return _reply(handler, 401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        if repo.gated:
            return _reply(handler, 403, {"X-Error-Code": "GatedRepo"})
        if repo.status:
            return _reply(handler, repo.status, {})
        if unquote(revision) not in ("main", repo.commit):
            return _reply(handler, 404, {"X-Error-Code": "RevisionNotFound"})
        path = repo.files.get(unquote(filename))
        if path is None:
            return _reply(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
        sha = sha256_of(path)
        headers = {"Location": f"{self.cdn_url}/blobs/{sha}", "X-Repo-Commit": repo.commit,
                   "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(path.stat().st_size),
                   "ETag": f'"{hashlib.sha1(sha.encode()).hexdigest()}"'}
        _reply(handler, 302, {k: v for k, v in headers.items() if v})  # commit "": a file server, not a hub

    def _cdn(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        sha = handler.path.removeprefix("/blobs/")
        path = next((p for r in self.repos.values() for p in r.files.values() if sha256_of(p) == sha), None)
        if path is None:
            return _reply(handler, 404, {})
        size = path.stat().st_size
        handler.send_response(200)
        handler.send_header("Content-Length", str(size))
        handler.send_header("ETag", f'"{sha}"')
        handler.end_headers()
        if body:
            _copy(path, handler.wfile, self.corrupt, self._closing if self.stall else None)


_SHA_CACHE: dict[Path, str] = {}


def sha256_of(path: Path) -> str:
    if path not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        _SHA_CACHE[path] = h.hexdigest()
    return _SHA_CACHE[path]


def _copy(path: Path, out, corrupt: bool, stall_until: threading.Event | None) -> None:
    with open(path, "rb") as f:
        first = True
        while chunk := f.read(CHUNK):
            if first and corrupt:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            out.write(chunk)
            if first and stall_until is not None:
                out.flush()
                stall_until.wait()
                return
            first = False


def _reply(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def _serve(hub: LocalHub, route) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            hub.requests.append((route.__name__.strip("_"), "HEAD", self.path))
            route(self, False)

        def do_GET(self) -> None:  # noqa: N802
            hub.requests.append((route.__name__.strip("_"), "GET", self.path))
            route(self, True)

        def log_message(self, *args) -> None:  # the test reads `requests`, not stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # A short poll: `shutdown` waits up to one poll interval, at every test's end.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server

"""Bearer API keys from a file: one key per line (`#` comments), or JSON (a list of keys, or
`{"keys": [...]}` whose entries are strings or `{"key": ..., "name": ...}`).

The file is read again when it changes (checked at most once a second), so keys can be added or
revoked without a restart. Keys are compared with `hmac.compare_digest` against every key.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("magi.gateway")

RECHECK_S = 1.0


def parse_keys(text: str) -> list[str]:
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        data = json.loads(stripped)
        entries = data.get("keys", []) if isinstance(data, dict) else data
        keys = [e.get("key", "") if isinstance(e, dict) else e for e in entries]
        return [k.strip() for k in keys if isinstance(k, str) and k.strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or ""."""
    if not header:
        return ""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class ApiKeys:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._reload()

    def _reload(self) -> None:
        self._checked = time.monotonic()
        try:
            st = self.path.stat()
        except OSError:
            if self._stamp != (0, 0):
                log.warning("no API keys file; every request gets 401", extra={"path": str(self.path)})
            self._keys, self._stamp = [], (0, 0)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            self._keys = [k.encode() for k in parse_keys(self.path.read_text())]
        except (OSError, ValueError) as exc:
            log.warning("API keys file unreadable; every request gets 401",
                        extra={"path": str(self.path), "error": type(exc).__name__})
            self._keys = []
        self._stamp = stamp
        log.info("API keys loaded", extra={"path": str(self.path), "keys": len(self._keys)})

    def check(self, authorization: str | None) -> bool:
        if time.monotonic() - self._checked > RECHECK_S:
            self._reload()
        token = bearer(authorization).encode()
        if not token:
            return False
        ok = False
        for key in self._keys:  # every key, so the time taken does not say which one nearly matched
            ok |= hmac.compare_digest(token, key)
        return ok

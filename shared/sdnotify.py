"""systemd's notify protocol over the socket it hands us (NOTIFY_SOCKET); no extra daemon or package.

With `Type=notify` and `WatchdogSec=`, a service says READY=1 once it serves and WATCHDOG=1 at least
every WatchdogSec; systemd restarts it when the pings stop. Outside systemd these calls do nothing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec (systemd's advice), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000

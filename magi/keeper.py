"""The local stack's keeper: restarts any of its processes that dies, as systemd does in a deployment.

`magi up` starts the stack, then this process (`python -m magi.keeper HOME`). Every half second it
checks each component in `$MAGI_HOME/run/stack.json`; one that is gone is started again with the same
command line and environment, after a back-off that grows while it keeps dying (0.5 s doubling to 30 s,
reset after a minute up). Each restart is one log line in `logs/keeper.log` and a count in stack.json,
which `magi status` shows. `magi down` stops the keeper first, so nothing it stops comes back.

Hand-written rather than supervisord: the stack already starts and orders its processes itself
(readiness by `$SRV.PING`, PostgreSQL through pgserver), and only restarts are missing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from magi import stack
from magi.procs import pid_alive

log = logging.getLogger("magi.keeper")

CHECK_S = 0.5
BACKOFF_BASE_S, BACKOFF_MAX_S, STABLE_S = 0.5, 30.0, 60.0


@dataclass
class Watch:
    failures: int = 0
    died_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def delay(self) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(self.failures - 1, 0))


class Keeper:
    def __init__(self, home: Path) -> None:
        self.cfg = stack.StackConfig(home=home)
        self.watches: dict[str, Watch] = {}
        self.children: dict[str, object] = {}  # processes this keeper started: reaped when they exit
        self.stopping = False

    def check(self) -> None:
        state = stack.read_state(self.cfg.home)
        if state is None:  # the stack was taken down (or its home removed) without us: nothing left to keep
            log.info("stack state gone; keeper exits", extra={"home": str(self.cfg.home)})
            self.stopping = True
            return
        now, changed = time.monotonic(), False
        for comp in state.components:
            if comp.name == "keeper" or self._alive(comp):
                continue
            watch = self.watches.setdefault(comp.name, Watch())
            if not watch.died_at:
                watch.failures = 1 if now - watch.started_at > STABLE_S else watch.failures + 1
                watch.died_at = now
                log.warning("component died; restarting", extra={"component": comp.name, "pid": comp.pid,
                                                                 "in_s": watch.delay(), "restarts": comp.restarts})
            if now - watch.died_at >= watch.delay() and not self.stopping:
                comp.pid = self._restart(comp)
                comp.restarts += 1
                watch.died_at, watch.started_at, changed = 0.0, now, True
        if changed:
            stack.save_state(self.cfg, state)

    def _alive(self, comp: stack.Component) -> bool:
        child = self.children.get(comp.name)
        if child is not None and child.pid == comp.pid:
            return child.poll() is None  # our own child: poll() also reaps it
        return pid_alive(comp.pid)

    def _restart(self, comp: stack.Component) -> int:
        if comp.name == "postgres":
            pid, _, _ = stack.start_postgres(self.cfg)
            return pid
        proc = stack.spawn(self.cfg, comp.name, comp.argv, dict(os.environ))
        self.children[comp.name] = proc
        log.info("component restarted", extra={"component": comp.name, "pid": proc.pid})
        return proc.pid

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        while not self.stopping:
            try:
                self.check()
            except Exception as exc:  # one bad round (a half-written state file) must not end the watch
                log.warning("keeper round failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            time.sleep(CHECK_S)

    def _stop(self, *_args) -> None:
        self.stopping = True


def main() -> None:
    from shared.logs import setup_logging

    setup_logging("keeper")
    Keeper(Path(sys.argv[1])).run()


if __name__ == "__main__":
    main()

"""Progress of a long compile: reads the build's output on stdin, keeps all of it in LOG, prints progress.

    pip wheel -v ... 2>&1 | python build-progress.py build.log

The steps come from ninja's `[n/N]` (or make's `[ 42%]`) lines that `pip -v` passes through from CMake.
A terminal sees one line rewritten in place; a pipe or CI log sees a line each tenth of the way and a
heartbeat with the elapsed time whenever the build is silent for EVERY seconds, so a build that is slow
is told apart from one that hangs. Exit status is 0: the caller takes the build's own from the pipeline.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import sys
import time

STEP = re.compile(rb"^\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")
PERCENT = re.compile(rb"^\s*\[\s*(\d+)%\]")


def elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def fraction(line: bytes) -> tuple[float, str] | None:
    """How far a build output line says the build is, and how to show it; None for any other line."""
    if found := STEP.match(line):
        done, total = int(found[1]), int(found[2])
        if total:
            return done / total, f"{done}/{total} steps"
    if found := PERCENT.match(line):
        return int(found[1]) / 100, f"{int(found[1])}%"
    return None


class Reporter:
    def __init__(self, out, *, every: float, terminal: bool, started: float | None = None) -> None:
        self.out, self.every, self.terminal = out, every, terminal
        self.started = started if started is not None else time.monotonic()
        self.last_print = self.started
        self.shown_tenth = -1
        self.state = "starting"

    def line(self, line: bytes) -> None:
        step = fraction(line)
        if step is None:
            return
        part, text = step
        self.state = f"{text} ({part:.0%})"
        tenth = int(part * 10)
        if self.terminal or tenth > self.shown_tenth:
            self.shown_tenth = tenth
            self.show()

    def tick(self) -> None:
        """Called when no output came for a while: a heartbeat if the last print is EVERY seconds old."""
        if time.monotonic() - self.last_print >= self.every:
            self.show()

    def show(self) -> None:
        text = f"building: {self.state}, {elapsed(time.monotonic() - self.started)} elapsed"
        if self.terminal:
            self.out.write(f"\r\x1b[2K{text}")
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.last_print = time.monotonic()

    def done(self) -> None:
        if self.terminal:
            self.out.write("\n")
        self.out.write(f"build output ended after {elapsed(time.monotonic() - self.started)}\n")
        self.out.flush()


def pump(source: int, log, reporter: Reporter) -> None:
    """Copy `source` to `log` line by line until EOF, reporting each line and ticking while it is silent."""
    pending = b""
    while True:
        ready, _, _ = select.select([source], [], [], min(reporter.every, 1.0))
        if not ready:
            reporter.tick()
            continue
        chunk = os.read(source, 65536)
        if not chunk:
            break
        log.write(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            reporter.line(line.rstrip(b"\r"))
        reporter.tick()
    log.flush()
    if pending:
        reporter.line(pending)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="file that receives the whole build output")
    parser.add_argument("--every", type=float, default=30.0, help="heartbeat interval in seconds (default 30)")
    args = parser.parse_args(argv)
    reporter = Reporter(sys.stderr, every=args.every, terminal=sys.stderr.isatty())
    with open(args.log, "ab") as log:
        pump(sys.stdin.fileno(), log, reporter)
    reporter.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Terminal output of the CLI, through rich: tables, and progress for long steps.

On a terminal, tables fit its width and progress is a live spinner with elapsed time; piped or
redirected, tables keep their natural width (nothing wraps, so `grep` and `awk` see whole rows) and
progress is one plain line per step, so logs of `magi up` in CI stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def _console(file: TextIO, **options) -> Console:
    console = Console(file=file, highlight=False, **options)
    if not console.is_terminal:  # piped: as wide as the content, so no row is wrapped or cut
        console = Console(file=file, highlight=False, width=100_000, **options)
    return console


def render(headers: list[str], rows: list[list[object]], *, title: str | None = None) -> str:
    """A table as text for stdout. Cells are plain text: `[x]` in a cell is not read as rich markup."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold", title=title,
                  title_justify="left", title_style="bold")
    for header in headers:
        table.add_column(str(header), overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    console = _console(sys.stdout)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines()).strip("\n")


class Steps:
    """Progress of a sequence of steps: each message starts a step and ends the one before.

    A terminal shows each step with a spinner while it runs and its elapsed time once done; anywhere else
    each step is a `... message` line and a slow one (over SLOW_S) adds how long it took when it ends.
    Use as a context manager; the object itself is the `progress(message)` callback.
    """

    SLOW_S = 2.0

    def __init__(self, file: TextIO | None = None) -> None:
        self.console = _console(file or sys.stderr)
        self._live: Progress | None = None
        self._task: TaskID | None = None
        self._step: tuple[str, float] | None = None

    def __enter__(self) -> "Steps":
        if self.console.is_terminal:
            self._live = Progress(SpinnerColumn(spinner_name="line", finished_text="-"),
                                  TextColumn("{task.description}"), TimeElapsedColumn(), console=self.console)
            self._live.start()
        return self

    def __call__(self, message: str) -> None:
        self._end()
        if self._live is not None:
            self._task = self._live.add_task(message, total=1)
        else:
            print(f"... {message}", file=self.console.file, flush=True)
        self._step = (message, time.monotonic())

    def note(self, message: str) -> None:
        """A line above the live display (or a plain line), without starting a step."""
        if self._live is not None:
            self._live.console.print(Text(message))
        else:
            print(f"... {message}", file=self.console.file, flush=True)

    def _end(self) -> None:
        if self._step is None:
            return
        message, started = self._step
        self._step = None
        if self._live is not None and self._task is not None:
            self._live.update(self._task, completed=1)
            self._live.stop_task(self._task)
        elif (took := time.monotonic() - started) >= self.SLOW_S:
            print(f"    {message}: {took:.1f} s", file=self.console.file, flush=True)

    def __exit__(self, *exc) -> None:
        self._end()
        if self._live is not None:
            self._live.stop()


class Tally(Steps):
    """Progress toward a known number of items (a mission's clones): each message is one item done,
    printed as it comes, under a live `label n/total` line with elapsed time on a terminal."""

    def __init__(self, label: str, total: int, file: TextIO | None = None) -> None:
        super().__init__(file)
        self.label, self.total, self.done = label, total, 0

    def __enter__(self) -> "Tally":
        super().__enter__()
        if self._live is not None:
            self._task = self._live.add_task(self._description(), total=self.total)
        return self

    def _description(self) -> str:
        return f"{self.label} {self.done}/{self.total}"

    def __call__(self, message: str) -> None:
        self.done += 1
        self.note(message)
        if self._live is not None and self._task is not None:
            self._live.update(self._task, completed=self.done, description=self._description())

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()

"""A replica's restart budget: a few failures in a row are retried, a crash loop is given up on.

The count starts again after a stable stretch, so a replica that fails once a day is never given up
on because of failures weeks apart (a budget that never resets runs out on a healthy replica).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

MAX_FAILURES = 5  # failures in a row (each closer than STABLE_S to the last) before a replica is given up
STABLE_S = 300.0  # this long without a failure and the count starts again


@dataclass
class RestartBudget:
    max_failures: int = MAX_FAILURES
    stable_s: float = STABLE_S
    clock: Callable[[], float] = time.monotonic
    spent: int = 0
    last_failure: float | None = field(default=None)

    def _settled(self, now: float) -> bool:
        return self.last_failure is None or now - self.last_failure >= self.stable_s

    def spend(self) -> bool:
        """Count a failure; True while another start is allowed."""
        now = self.clock()
        if self._settled(now):
            self.spent = 0
        self.spent += 1
        self.last_failure = now
        return self.spent <= self.max_failures

    def exhausted(self) -> bool:
        """No start is allowed until a stable stretch has passed."""
        return self.spent >= self.max_failures and not self.refilled()

    def refilled(self) -> bool:
        """True once a stable stretch has passed since the last failure (a given-up replica may try again)."""
        return self._settled(self.clock())

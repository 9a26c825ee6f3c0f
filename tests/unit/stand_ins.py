"""Pieces of stand-in replica actors shared by the keeper's and the live catalogue's unit tests (Ray and
llama.cpp themselves are exercised by the integration tests)."""

import itertools

pids = itertools.count(100)  # each stand-in actor's "process id"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Method:
    """An actor method: `.remote(...)` calls the function (a coroutine function gives an awaitable, as Ray's
    ObjectRef is)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)

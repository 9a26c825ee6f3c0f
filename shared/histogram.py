"""Fixed-bucket latency histograms that travel in `$SRV.STATS`.

Every MAGI service keeps one per endpoint and reports it in the endpoint's `data.latency`, so the
gateway's `/metrics` can expose Prometheus histograms for processes that serve no HTTP of their own.
The buckets are fixed (Prometheus's defaults stretched to generation and mission times) so histograms
from every instance of a service can be summed in PromQL.

Encoding: `{"le": [finite upper bounds, s], "counts": [per bucket; one more than "le", the last is
over the largest bound], "sum_s": seconds in all}`. Counts are per bucket, not cumulative, so a reader
never has to trust that the sender kept them monotonic; `cumulative` turns them into Prometheus's form.
"""

from __future__ import annotations

from bisect import bisect_left

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS_S) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be distinct and rising")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect_left(self.bounds, seconds)] += 1  # `le`: a value on a bound counts in that bucket
        self.sum_s += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def encode(self) -> dict:
        return {"le": list(self.bounds), "counts": list(self.counts), "sum_s": round(self.sum_s, 6)}


def cumulative(encoded: dict) -> tuple[list[tuple[str, float]], float, int]:
    """Prometheus buckets (`le` label, cumulative count, `+Inf` last), the sum and the count of an
    encoded histogram; ValueError for one that is malformed (another version, or not a histogram)."""
    try:
        bounds = [float(b) for b in encoded["le"]]
        counts = [int(c) for c in encoded["counts"]]
        total_s = float(encoded["sum_s"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an encoded histogram: {exc}") from None
    if len(counts) != len(bounds) + 1 or bounds != sorted(set(bounds)) or min(counts, default=0) < 0:
        raise ValueError("an encoded histogram needs rising bounds and one count more than bounds")
    buckets, running = [], 0
    for bound, n in zip([*map(_le, bounds), "+Inf"], counts):
        running += n
        buckets.append((bound, float(running)))
    return buckets, total_s, running


def _le(bound: float) -> str:
    """A bound as Prometheus's own clients write it (`0.5`, `1.0`, `60.0`)."""
    return repr(float(bound))

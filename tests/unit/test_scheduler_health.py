from datetime import datetime, timezone

import pytest

from protos.node import Heartbeat
from services.scheduler.cluster import NodeConfig
from services.scheduler.health import build_report, node_state, status_of

pytestmark = pytest.mark.unit


def hb(node="n1", **kw) -> Heartbeat:
    base = dict(node=node, seq=1, sent_at=0.0, ram_total_gb=64.0, ram_used_gb=36.0, ram_percent=56.25)
    base.update(kw)
    return Heartbeat(**base)


def test_healthy_until_three_intervals_are_missed():
    assert status_of(hb(), last_seen=100.0, now=102.9, interval=1.0, maintenance=False) == "HEALTHY"
    assert status_of(hb(), last_seen=100.0, now=103.1, interval=1.0, maintenance=False) == "UNAVAILABLE"


def test_never_heard_since_start_is_unavailable():
    assert status_of(hb(), last_seen=None, now=5.0, interval=1.0, maintenance=False) == "UNAVAILABLE"


def test_agent_reported_degradation_passes_through_and_maintenance_wins():
    assert status_of(hb(health="DEGRADED"), 10.0, 10.5, 1.0, False) == "DEGRADED"
    assert status_of(hb(), 10.0, 10.5, 1.0, True) == "MAINTENANCE"


@pytest.mark.parametrize("skew", [-600.0, 600.0])
def test_agent_clock_skew_changes_nothing(skew):
    # Liveness uses only the scheduler's receipt time; sent_at is informational.
    assert status_of(hb(sent_at=1e9 + skew), 50.0, 50.5, 1.0, False) == "HEALTHY"


def test_report_matches_the_seed_shape():
    jetson = NodeConfig(name="jetson", ram_gb=64.0, gpu=True, gpu_memory_gb=64.0, max_instances=4, reserved_ram_gb=8.0)
    rpi = NodeConfig(name="rpi1", ram_gb=8.0, max_instances=1, reserved_ram_gb=1.0)
    states = {"jetson": node_state(hb("jetson", ram_percent=95.0), 10.0, 10.2, 1.0, False),
              "rpi1": node_state(hb("rpi1"), None, 10.2, 1.0, False)}
    report = build_report([jetson, rpi], states, {"jetson": (3, 36.0), "rpi1": (1, 6.0)}, ["extra"],
                          when=datetime(2025, 11, 16, 12, tzinfo=timezone.utc))
    assert report.timestamp == "2025-11-16T12:00:00+00:00"
    assert report.total_nodes == 2 and report.total_instances == 4
    j, r = report.nodes
    assert (j.status, j.instances, j.max_instances, j.ram_allocated_gb, j.ram_total_gb, j.ram_utilization_percent, j.gpu) \
        == ("healthy", 3, 4, 36.0, 64.0, 56.25, True)
    assert (r.status, r.instances, r.ram_utilization_percent, r.gpu) == ("unavailable", 1, 75.0, False)
    assert report.warnings == ["node jetson RAM at 95.0 %",
                               "node rpi1 is unavailable (not heard from since the scheduler started)", "extra"]

"""The agent's lease: never below the scheduler's failover grace; by default it outlasts a scheduler handover."""

import pytest

from services.scheduler.health import MISSED_BEATS
from shared.config import Settings, load_settings
from shared.errors import BadRequest

pytestmark = pytest.mark.unit


def test_the_default_lease_outlasts_failover_and_a_handover():
    s = Settings(heartbeat_s=1.0, sched_lease_s=3.0)
    assert s.failover_grace_s() == MISSED_BEATS * 1.0
    assert s.agent_lease() == 10.0  # ten beats; more than grace + two scheduler leases (9 s)
    assert Settings(heartbeat_s=0.2, sched_lease_s=3.0).agent_lease() == pytest.approx(0.6 + 6.0)


@pytest.mark.parametrize("asked, expected", [(0.1, 3.0), (3.0, 3.0), (7.5, 7.5)])
def test_a_lease_below_the_grace_is_raised_to_it(asked, expected):
    assert Settings(heartbeat_s=1.0, agent_lease_s=asked).agent_lease() == expected


def test_the_leases_come_from_the_environment():
    s = load_settings({"MAGI_AGENT_LEASE_S": "12", "MAGI_SCHED_LEASE_S": "1.5"})
    assert (s.agent_lease_s, s.sched_lease_s) == (12.0, 1.5)
    with pytest.raises(BadRequest, match="MAGI_SCHED_LEASE_S"):
        load_settings({"MAGI_SCHED_LEASE_S": "0"})
    with pytest.raises(BadRequest, match="MAGI_AGENT_LEASE_S"):
        load_settings({"MAGI_AGENT_LEASE_S": "-1"})

"""Node status and the seed-002 report, as pure functions of what the scheduler has seen.

Liveness is judged only by the scheduler's own monotonic clock at receipt: an agent whose wall clock
is minutes off neither dies nor comes back to life because of it.
"""

from __future__ import annotations

from datetime import datetime, timezone

from protos.node import ClusterReport, Health, Heartbeat, NodeReport, NodeState
from services.scheduler.cluster import NodeConfig
from shared.config import FAILOVER_MISSED_BEATS

MISSED_BEATS = FAILOVER_MISSED_BEATS  # one number for the scheduler's grace and the agents' lease floor
DEFAULT_MAX_INSTANCES = 4
WARN_PERCENT = 90.0


def status_of(hb: Heartbeat, last_seen: float | None, now: float, interval: float, maintenance: bool) -> Health:
    """MAINTENANCE wins; then UNAVAILABLE when silent for more than 3 intervals (or never heard); else the agent's own."""
    if maintenance:
        return "MAINTENANCE"
    if last_seen is None or now - last_seen > MISSED_BEATS * interval:
        return "UNAVAILABLE"
    return hb.health


def node_state(hb: Heartbeat, last_seen: float | None, now: float, interval: float, maintenance: bool) -> NodeState:
    age = None if last_seen is None else round(now - last_seen, 3)
    return NodeState(name=hb.node, status=status_of(hb, last_seen, now, interval, maintenance),
                     last_seen_s=age, heartbeat=hb)


def max_instances(hb: Heartbeat) -> int:
    """From the agent's `max_instances` label (MAGI_NODE_LABELS); a missing or bad label gives the default."""
    try:
        value = int(hb.labels.get("max_instances", DEFAULT_MAX_INSTANCES))
    except ValueError:
        return DEFAULT_MAX_INSTANCES
    return value if value >= 0 else DEFAULT_MAX_INSTANCES


def node_report(node: NodeConfig, st: NodeState | None, count: int, ram_allocated: float) -> NodeReport:
    util = round(100.0 * ram_allocated / node.ram_gb, 2) if node.ram_gb > 0 else 0.0
    return NodeReport(
        name=node.name, status=(st.status if st else "UNAVAILABLE").lower(), instances=count,
        max_instances=node.max_instances, ram_allocated_gb=round(ram_allocated, 3), ram_total_gb=node.ram_gb,
        ram_utilization_percent=util, gpu=node.gpu,
    )


def node_warnings(name: str, st: NodeState | None) -> list[str]:
    if st is None or st.status == "UNAVAILABLE":
        seen = "not heard from since the scheduler started" if st is None or st.last_seen_s is None else \
            f"last seen {st.last_seen_s:.1f} s ago"
        return [f"node {name} is unavailable ({seen})"]  # its figures are stale: no resource warnings
    hb, warnings = st.heartbeat, []
    if hb.ram_percent > WARN_PERCENT:
        warnings.append(f"node {name} RAM at {hb.ram_percent:.1f} %")
    if hb.disk_percent > WARN_PERCENT:
        warnings.append(f"node {name} disk at {hb.disk_percent:.1f} %")
    return warnings


def build_report(nodes: list[NodeConfig], states: dict[str, NodeState], allocated: dict[str, tuple[int, float]],
                 extra_warnings: list[str] = (), when: datetime | None = None) -> ClusterReport:
    reports = [node_report(n, states.get(n.name), *allocated.get(n.name, (0, 0.0))) for n in nodes]
    warnings = [w for n in nodes for w in node_warnings(n.name, states.get(n.name))] + list(extra_warnings)
    return ClusterReport(
        timestamp=(when or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        total_nodes=len(reports), total_instances=sum(r.instances for r in reports), nodes=reports, warnings=warnings,
    )

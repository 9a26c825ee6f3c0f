"""Node status and the seed-002 report, as pure functions of what the scheduler has seen.

Liveness is judged only by the scheduler's own monotonic clock at receipt: an agent whose wall clock
is minutes off neither dies nor comes back to life because of it.
"""

from __future__ import annotations

from datetime import datetime, timezone

from protos.node import ClusterReport, Health, Heartbeat, NodeReport, NodeState

MISSED_BEATS = 3
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


def node_report(st: NodeState) -> NodeReport:
    hb = st.heartbeat
    util = round(100.0 * hb.ram_used_gb / hb.ram_total_gb, 2) if hb.ram_total_gb > 0 else 0.0
    return NodeReport(
        name=st.name, status=st.status.lower(), instances=len(hb.instances), max_instances=max_instances(hb),
        ram_allocated_gb=hb.ram_used_gb, ram_total_gb=hb.ram_total_gb, ram_utilization_percent=util,
        gpu=bool(hb.gpus),
    )


def node_warnings(st: NodeState) -> list[str]:
    if st.status == "UNAVAILABLE":
        seen = "not heard from since the scheduler started" if st.last_seen_s is None else \
            f"last seen {st.last_seen_s:.1f} s ago"
        return [f"node {st.name} is unavailable ({seen})"]  # its figures are stale: no resource warnings
    hb, warnings = st.heartbeat, []
    if hb.ram_percent > WARN_PERCENT:
        warnings.append(f"node {st.name} RAM at {hb.ram_percent:.1f} %")
    if hb.disk_percent > WARN_PERCENT:
        warnings.append(f"node {st.name} disk at {hb.disk_percent:.1f} %")
    return warnings


def build_report(states: list[NodeState], when: datetime | None = None) -> ClusterReport:
    nodes = [node_report(st) for st in states]
    warnings = [w for st in states for w in node_warnings(st)]
    return ClusterReport(
        timestamp=(when or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        total_nodes=len(nodes), total_instances=sum(n.instances for n in nodes), nodes=nodes, warnings=warnings,
    )

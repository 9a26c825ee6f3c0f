"""`magi cluster init`: everything a multi-machine MAGI needs, from the cluster file users already have.

Writes into DIR (nothing of it belongs in git; secret files are mode 0600):

    DIR/ca/ca.pem, ca-key.pem          the cluster's CA (keep the key off the nodes)
    DIR/secrets/*.nk, ray-token        master copies of every credential
    DIR/operator/                      the operator's workstation: admin.nk, client.nk, ca.pem, magi.env, api_key
    DIR/nodes/<node>/                  copy to <etc> (default /etc/magi) on that node:
        magi.env                       its environment (bus URLs, CA, cluster address, Ray join, RPC ports)
        ca.pem                         to verify the NATS servers
        credentials/agent.nk           its agent's nkey seed (systemd LoadCredential)
        credentials/<service>.nk       seeds of the services it hosts (the head)
        credentials/api_keys           the head's gateway: bearer keys of the OpenAI-compatible API
        credentials/gateway-key.pem    the head's gateway: its HTTPS key (tls/gateway.pem, from the CA)
        credentials/ray-token          Ray's cluster token (RAY_AUTH_MODE=token everywhere)
        nats.conf, tls/nats*.pem       on NATS server nodes: the server's config and certificate
        agent.yaml                     the node's instance policy: nothing allowed until the operator lists it
        magi.nft                       nftables rules: Ray's and RPC shards' ports open to cluster members only

Running it again with the same DIR keeps every existing key and certificate and writes the files of new
nodes, so adding a node is: add it to the cluster file, run this again, copy the node's folder and the
new nats.conf, reload nats-server (`nats-server --signal reload`).
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from magi import pki
from magi.natsconf import Routes, Tls, server_config
from services.agent.rayjoin import AUTOSCALER_METRIC_PORT, RAY_NODE_PORTS, RAY_WORKER_PORTS
from services.scheduler.cluster import ClusterConfig, NodeConfig, unused_ssh_fields
from shared import natsauth
from shared.roles import SERVICE_ROLES, USER_ROLES, agent_identity

RAY_PORT = 6380  # seed 001's choice: 6379 is Redis's
RPC_PORTS = "50100-50199"


@dataclass
class Plan:
    cluster: ClusterConfig
    head: NodeConfig  # runs the services, Redis, PostgreSQL and the Ray head
    nats: list[NodeConfig]  # 1 or 3 NATS servers
    etc: str  # where a node's folder is installed ("{node}" is replaced by the node's name)
    state: str  # MAGI_HOME on the nodes (likewise)
    nats_port: int = 4222
    route_port: int = 6222
    monitor_port: int = 8222  # nats-server's HTTP monitoring, on loopback only; 0: off
    http_port: int = 8443  # the head's gateway (HTTPS, OpenAI-compatible API, /metrics, dashboard)

    def node(self, name: str) -> NodeConfig:
        return next(n for n in self.cluster.nodes if n.name == name)

    def etc_of(self, node: NodeConfig) -> str:
        return self.etc.replace("{node}", node.name)

    def state_of(self, node: NodeConfig) -> str:
        return self.state.replace("{node}", node.name)


def make_plan(cluster: ClusterConfig, head: str = "", nats: list[str] = (), etc: str = "/etc/magi",
              state: str = "/var/lib/magi", **ports: int) -> Plan:
    names = [n.name for n in cluster.nodes]
    head = head or names[0]
    nats = list(nats) or [head]
    for name in (head, *nats):
        if name not in names:
            raise ValueError(f"{name!r} is not a node of the cluster file (nodes: {', '.join(names)})")
    if len(nats) not in (1, 3):
        raise ValueError("run 1 NATS server, or 3 for a cluster that survives losing one (R3 streams)")
    for node in cluster.nodes:
        if node.host in ("", "0.0.0.0", "::"):
            raise ValueError(f"node {node.name}: host {node.host!r} must be its address on the cluster network")
    plan = Plan(cluster=cluster, head=None, nats=[], etc=etc.rstrip("/"), state=state, **ports)  # type: ignore[arg-type]
    plan.head, plan.nats = plan.node(head), [plan.node(n) for n in nats]
    return plan


def nats_urls(plan: Plan) -> str:
    return ",".join(f"tls://{n.host}:{plan.nats_port}" for n in plan.nats)


def _env_file(plan: Plan, node: NodeConfig) -> str:
    lines = {
        "MAGI_NODE_NAME": node.name,
        "MAGI_CLUSTER_ADDRESS": node.host,
        "MAGI_NATS_URL": nats_urls(plan),
        "MAGI_NATS_CA": f"{plan.etc_of(node)}/ca.pem",
        "MAGI_HOME": plan.state_of(node),
        "MAGI_AGENT_POLICY": f"{plan.etc_of(node)}/agent.yaml",
        "MAGI_RPC_PORTS": RPC_PORTS,
        "MAGI_STREAM_REPLICAS": str(len(plan.nats)),
        "RAY_AUTH_MODE": "token",
    }
    if node.name == plan.head.name:
        # The head's agent runs the Ray head on its cluster address; its inference service connects to it.
        lines["MAGI_RAY_HEAD_PORT"] = str(RAY_PORT)
        lines["MAGI_RAY_ADDRESS"] = f"{node.host}:{RAY_PORT}"
        # Its gateway serves HTTPS on the cluster network (certificate from the cluster's CA); the key and
        # the API keys come as systemd credentials (magi-service@gateway.service.d/http.conf).
        lines["MAGI_HTTP_HOST"] = node.host
        lines["MAGI_HTTP_PORT"] = str(plan.http_port)
        lines["MAGI_HTTP_TLS_CERT"] = f"{plan.etc_of(node)}/tls/gateway.pem"
    else:
        lines["MAGI_RAY_JOIN"] = f"{plan.head.host}:{RAY_PORT}"
    header = (f"# MAGI environment of node {node.name} (written by `magi cluster init`; mode 600).\n"
              "# Secrets are not here: the units load them as systemd credentials (MAGI_NATS_CREDS=%d/nats.nk,\n"
              f"# RAY_AUTH_TOKEN_PATH=%d/ray-token). Run by hand: point those at {plan.etc_of(node)}/credentials/.\n")
    return header + "".join(f"{k}={v}\n" for k, v in lines.items() if v != "")


def guarded_ports(plan: Plan) -> list[str]:
    """Ray's and the RPC shards' ports: no authentication of their own beyond Ray's token (RPC: none)."""
    ray_node = sorted({RAY_PORT, *RAY_NODE_PORTS.values(), AUTOSCALER_METRIC_PORT})
    return [f"{ray_node[0]}-{ray_node[-1]}", f"{RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]}", RPC_PORTS]


def firewall_rules(plan: Plan, node: NodeConfig) -> str:
    """An nftables table that lets only the cluster's members reach Ray's and the RPC shards' ports.

    Ray 2.60 binds its GCS, raylet, object manager and worker servers on every interface whenever the
    node address is not loopback (it has no bind-address option); this keeps them to the cluster
    network. NATS needs no rule: it listens on the cluster address only and authenticates everyone.
    """
    members = ", ".join(n.host for n in plan.cluster.nodes)
    ports = ", ".join(guarded_ports(plan))
    return (f"# MAGI on {node.name}: Ray and RPC shard ports reachable from cluster members only.\n"
            "# Written by `magi cluster init`; loaded by magi-firewall.service (nft -f).\n"
            "table inet magi {}\ndelete table inet magi\n"
            "table inet magi {\n"
            f"  set members {{ type ipv4_addr; elements = {{ {members} }} }}\n"
            "  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            '    iifname "lo" accept\n'
            f"    tcp dport {{ {ports} }} ip saddr @members accept\n"
            f"    tcp dport {{ {ports} }} drop\n"
            "  }\n}\n")


POLICY_TEMPLATE = """\
# What instances the scheduler assigns may run on this node (see services/agent/policy.py).
# Nothing is allowed until you list it. MAGI's own parts (Ray join, replicas, RPC shards) need no entry.
programs: []
#  - /usr/bin/sleep
env: []
#  - CUDA_VISIBLE_DEVICES
run_as: ""
"""


def _secret(path: Path, make) -> bytes:
    if not path.exists():
        natsauth.write_private(path, make())
    return path.read_bytes()


def init(directory: Path, plan: Plan) -> list[str]:
    """Write everything; return what the operator should know (unused SSH fields, where things went)."""
    secrets_dir, ca_dir = directory / "secrets", directory / "ca"
    identities = [*SERVICE_ROLES, *USER_ROLES, *(agent_identity(n.name) for n in plan.cluster.nodes)]
    users = {i: natsauth.ensure_seed(secrets_dir, i) for i in identities}
    token = _secret(secrets_dir / "ray-token", lambda: secrets.token_hex(32).encode())
    _secret(secrets_dir / "api_key", lambda: (secrets.token_urlsafe(32) + "\n").encode())
    ca_pem, _ = pki.ensure_ca(ca_dir, plan.cluster.cluster.name)
    for node in plan.cluster.nodes:
        _node_folder(directory, plan, node, users, token, ca_pem)
    _operator_folder(directory / "operator", plan, ca_pem)
    notes = [f"{directory / 'nodes' / n.name}/ -> {plan.etc_of(n)}/ on {n.name} ({n.host})" for n in plan.cluster.nodes]
    notes += [f"nodes[{i}] ({n.name}): {', '.join(unused)} read but not used: MAGI's node agents replace SSH"
              for i, n in enumerate(plan.cluster.nodes) if (unused := unused_ssh_fields(n))]
    return notes


def _node_folder(directory: Path, plan: Plan, node: NodeConfig, users: dict[str, str], token: bytes,
                 ca_pem: Path) -> None:
    out = directory / "nodes" / node.name
    creds = out / "credentials"
    creds.mkdir(parents=True, exist_ok=True)
    secrets_dir = directory / "secrets"
    natsauth.write_private(creds / "agent.nk", (secrets_dir / f"{agent_identity(node.name)}.nk").read_bytes())
    if node.name == plan.head.name:
        for role in SERVICE_ROLES:
            natsauth.write_private(creds / f"{role}.nk", (secrets_dir / f"{role}.nk").read_bytes())
        natsauth.write_private(creds / "api_keys", (secrets_dir / "api_key").read_bytes())
        _gateway_certificate(directory, out, node)
    natsauth.write_private(creds / "ray-token", token)
    shutil.copyfile(ca_pem, out / "ca.pem")
    natsauth.write_private(out / "magi.env", _env_file(plan, node).encode())
    if not (out / "agent.yaml").exists():
        (out / "agent.yaml").write_text(POLICY_TEMPLATE)
    (out / "magi.nft").write_text(firewall_rules(plan, node))
    if node.name in {n.name for n in plan.nats}:
        tls_dir = out / "tls"
        if not (tls_dir / "nats.pem").exists():
            pki.issue(directory / "ca", tls_dir, "nats", [node.host, node.name, "127.0.0.1", "localhost"])
        etc = plan.etc_of(node)
        etc_tls = Tls(cert=Path(etc, "tls", "nats.pem"), key=Path(etc, "tls", "nats-key.pem"), ca=Path(etc, "ca.pem"))
        routes = None
        if len(plan.nats) > 1:
            routes = Routes(name=plan.cluster.cluster.name, listen=f"{node.host}:{plan.route_port}",
                            peers=[f"nats-route://{n.host}:{plan.route_port}" for n in plan.nats])
        (out / "nats.conf").write_text(server_config(
            listen=f"{node.host}:{plan.nats_port}", store_dir=Path(plan.state_of(node), "nats"), users=users, tls=etc_tls,
            server_name=node.name, monitor=f"127.0.0.1:{plan.monitor_port}" if plan.monitor_port else "",
            routes=routes))


def _gateway_certificate(directory: Path, out: Path, node: NodeConfig) -> None:
    """The head's HTTPS certificate (kept across runs); its key goes with the credentials, not beside it."""
    tls_dir = out / "tls"
    if not (tls_dir / "gateway.pem").exists():
        _, key = pki.issue(directory / "ca", tls_dir, "gateway", [node.host, node.name, "127.0.0.1", "localhost"])
        natsauth.write_private(out / "credentials" / "gateway-key.pem", key.read_bytes())
        key.unlink()


def _operator_folder(out: Path, plan: Plan, ca_pem: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for role in USER_ROLES:
        natsauth.write_private(out / f"{role}.nk", (out.parent / "secrets" / f"{role}.nk").read_bytes())
    natsauth.write_private(out / "api_key", (out.parent / "secrets" / "api_key").read_bytes())
    shutil.copyfile(ca_pem, out / "ca.pem")
    natsauth.write_private(out / "magi.env", (
        "# The operator's workstation: `set -a; . ./magi.env; set +a`, then any `magi` command.\n"
        f"MAGI_NATS_URL={nats_urls(plan)}\nMAGI_NATS_CA={out.resolve() / 'ca.pem'}\n"
        f"MAGI_NATS_CREDS={out.resolve() / 'admin.nk'}\n"
        "# The OpenAI-compatible API (key in ./api_key; clients verify it with ./ca.pem, e.g. SSL_CERT_FILE):\n"
        f"MAGI_API_URL=https://{plan.head.host}:{plan.http_port}/v1\n").encode())

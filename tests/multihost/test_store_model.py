"""A node that never had a model file serves a replica of it, on hosts made of network namespaces configured by
`magi cluster init` (test_three_hosts.py's cluster, cut down to what this needs).

Host a: NATS (TLS, nkey users), Redis, the scheduler, the inference service and the Ray head (its agent). Host
c: an agent that joins Ray and nothing else. The operator uploads the model into the bus's model store; the
catalogue names it `store:NAME` pinned to c. c's agent fetches it into c's own cache (`$MAGI_HOME/models`),
verified by digest, before the replica starts there; the replica maps that file, a generation lands on it, and
c's heartbeat lists the digest. (The hosts share one filesystem, so "never had" is c's cache: empty before.)
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import yaml

from tests.multihost.hosts import Network, apply_firewall, brought_up
from tests.multihost.test_three_hosts import REASON, REDIS_PORT, Cluster, _env_file, _namespace_of

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(900),
              pytest.mark.skipif(bool(REASON), reason=f"multihost: {REASON}")]

REPO = Path(__file__).resolve().parents[2]
STORED = "smol-stored"  # the object's name in the model store
MODEL = "from-store"  # the catalogue's model
SERVICES_ON_A = ("scheduler", "inference")


class StoreCluster(Cluster):
    """Hosts a and c; the model is uploaded before the inference service starts."""

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.net = Network(["a", "c"], work)

    def up(self) -> None:
        self.net.up()
        hosts = self.net.hosts
        self.init_material()
        for host in hosts.values():
            apply_firewall(host, self.out / "nodes" / host.name / "magi.nft")
        self.url = _env_file(self.out / "nodes" / "a" / "magi.env")["MAGI_NATS_URL"]
        self.admin = str(self.out / "operator" / "admin.nk")
        self.client = str(self.out / "operator" / "client.nk")
        catalogue = {"models": [{"name": MODEL, "source": f"store:{STORED}", "roles": ["heavy", "fast"], "node": "c",
                                 "threads": 1, "n_ctx": 512}]}
        (self.work / "models.yaml").write_text(yaml.safe_dump(catalogue))
        self._start_a_stores()
        self.stored = self.probe("a", "upload", STORED, seed=self.admin)
        a, c = hosts["a"], hosts["c"]
        agent = [sys.executable, "-m", "services.agent"]
        a.popen(agent, self.node_env("a", "agent"), "agent", cwd=str(REPO))
        a.wait_listening(int(_env_file(self.out / "nodes" / "a" / "magi.env")["MAGI_RAY_HEAD_PORT"]), 90)
        c.popen(agent, self.node_env("c", "agent"), "agent", cwd=str(REPO))
        self.c_cache = Path(_env_file(self.out / "nodes" / "c" / "magi.env")["MAGI_HOME"]) / "models"
        self.c_had_it = self.cached_on_c().exists()
        stores = {"MAGI_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0", "MAGI_PG_DSN": self.pg_dsn,
                  "MAGI_MODELS_FILE": str(self.work / "models.yaml")}
        for name in SERVICES_ON_A:
            a.popen([sys.executable, "-m", f"services.{name}"], self.node_env("a", name, **stores), name,
                    cwd=str(REPO))
            self.probe("a", "services", name, seed=self.admin)
            if name == "scheduler":
                self.probe("a", "nodes", "a", "c", seed=self.admin)
        self.models = self.probe("a", "models", MODEL, seed=self.admin)

    def cached_on_c(self) -> Path:
        return self.c_cache / f"{self.stored['digest'].removeprefix('sha256:')}.gguf"


@pytest.fixture(scope="module")
def cluster():
    with brought_up(StoreCluster, "magi-multihost-store") as built:
        yield built


def test_a_node_that_never_had_the_model_serves_it_from_its_verified_cache(cluster):
    digest = cluster.stored["digest"]
    assert not cluster.c_had_it  # c's cache was empty of it when the inference service started
    [model] = [m for m in cluster.models["models"] if m["name"] == MODEL]
    [replica] = model["replicas"]
    assert replica["node"] == "c" and replica["digest"] == digest == model["digest"]
    assert _namespace_of(replica["pid"]) == cluster.net.hosts["c"].ns
    # The file in c's cache is exactly the stored bytes, and it is the one the replica's llama.cpp mapped.
    cached = cluster.cached_on_c()
    assert "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    maps = Path(f"/proc/{replica['pid']}/maps").read_text()
    assert str(cached) in maps, f"replica {replica['pid']} does not map {cached}"
    # A generation from c that asks for those bytes lands on c's replica.
    reply = cluster.probe("c", "generate", MODEL, digest, seed=cluster.client)
    assert reply["text"] and reply["node"] == "c" and reply["replica"] == replica["replica"]
    assert digest in cluster.probe("a", "node_info", "c", seed=cluster.admin)["models"]

"""A replica follows its node, on a real two-node Ray cluster with real llama.cpp replicas (inside a
private network namespace, as test_ray_join.py): placed on `nodeb`, it moves to `head` when its
placement changes while nodeb lives (a drain: make before break), back to nodeb, and when nodeb's Ray
node dies it is started again on `head` once the placement says so.

The scheduler's answers are scripted (a ReplicaFactory whose placement is a variable): the inference
side's contract is only that `magi.sched.place` answers an instance's current node, and the
scheduler's own failover is tested elsewhere. Run as a module (`python -m
tests.integration.test_replica_follow TEMP`) inside the namespace; pytest runs the test below.
"""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.private_net import REASON, can_make_network_namespaces, connect_ray, run_probe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)
HEAD = "127.0.0.1:6391"


@pytest.mark.skipif(not can_make_network_namespaces(), reason=REASON)
def test_a_replica_follows_its_node_on_two_ray_nodes():
    temp = f"/tmp/magi-follow-{os.getpid()}"  # short: Ray's unix socket paths must fit 107 bytes
    result = run_probe("tests.integration.test_replica_follow", temp, timeout=280)
    assert result["started"] == "nodeb"
    assert result["drained"] == {"node": "head", "restarts": 0, "answered_on": "head"}
    assert result["back"] == {"node": "nodeb", "restarts": 0, "answered_on": "nodeb"}
    assert result["node_died"] == {"node": "head", "restarts": 1, "answered_on": "head"}
    assert result["nodeb_alive_in_ray"] is False


# ---- the probe (inside the namespace) ------------------------------------------------------------------------


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    temp = sys.argv[1]
    os.makedirs(temp, exist_ok=True)
    token = os.path.join(temp, "ray-token")
    with open(token, "w") as out:
        out.write("magi-follow-token-0123456789abcdef\n")
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token, MAGI_RAY_ADDRESS=HEAD)
    from services.agent.rayjoin import ray_worker_spec
    from shared.config import load_settings

    head = subprocess.Popen([f"{BIN}/ray", "start", "--block", "--head", "--node-ip-address", "127.0.0.1",
                             "--port", HEAD.rsplit(":", 1)[1], "--num-cpus", "1", "--include-dashboard=false",
                             "--disable-usage-stats", "--temp-dir", temp,
                             "--resources", json.dumps({"magi_node:head": 1000})],
                            env={**os.environ, "MAGI_NODE_NAME": "head"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = load_settings({"MAGI_RAY_JOIN": HEAD, "MAGI_CLUSTER_ADDRESS": "127.0.0.1", "MAGI_NODE_NAME": "head"})
    spec = ray_worker_spec(settings, "nodeb")
    worker = None
    try:
        import ray

        connect_ray(ray, HEAD, namespace="magi")
        worker = subprocess.Popen(spec.command, env={**os.environ, **spec.env, "MAGI_NODE_NAME": "nodeb"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: "magi_node:nodeb" in ray.cluster_resources(), 60, "nodeb to join Ray")
        print(json.dumps(asyncio.run(_scenario(settings, worker))))
        ray.shutdown()
    finally:
        for proc in (worker, head):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(60)


async def _scenario(settings, worker) -> dict:
    from services.inference.catalog import Catalog, ModelSpec
    from services.inference.replicas import ReplicaFactory, live_ray_nodes
    from services.inference.router import Router

    class ScriptedPlacement(ReplicaFactory):
        target = "nodeb"

        async def _place(self, pool, replica_id, specs):
            return [self.target] * len(specs)

        async def placements(self, replicas):
            return {r.replica_id: [self.target] for _, r in replicas}

    factory = ScriptedPlacement(settings, None)
    router = Router(Catalog(models=[ModelSpec(name="m", replicas=1, n_ctx=256, threads=1)]), follow_interval_s=0.5)
    await router.start(factory, where=factory.placements)
    pool = router.pools["m"]
    replica = pool.replicas[0]

    async def settled_on(node: str) -> dict:
        await _await(lambda: replica.state == "ready" and replica.node == node, 120, f"the replica on {node}")
        served, _, _ = await router.generate(pool, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                    "temperature": 0.0}, uuid.uuid4().hex)
        return {"node": replica.node, "restarts": replica.restarts, "answered_on": served.node}

    result = {"started": replica.node}
    try:
        factory.target = "head"  # nodeb drained: the scheduler placed the replica on head
        result["drained"] = await settled_on("head")
        factory.target = "nodeb"
        result["back"] = await settled_on("nodeb")
        worker.terminate()  # nodeb's Ray node dies; a few heartbeats later the scheduler re-places
        worker.wait(60)
        await asyncio.sleep(2)
        factory.target = "head"
        result["node_died"] = await settled_on("head")
        result["nodeb_alive_in_ray"] = "nodeb" in await asyncio.to_thread(live_ray_nodes)
    finally:
        await router.close()
    return result


async def _await(ok, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        await asyncio.sleep(0.2)


def _wait(ok, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.5)


if __name__ == "__main__":
    main()

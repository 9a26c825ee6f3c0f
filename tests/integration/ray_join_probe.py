"""Run by test_ray_join.py inside a private network namespace (only loopback exists there): a Ray head,
then the agent's `ray-worker` instance command for node `nodeb`; prints the node resources and where an
actor pinned to `magi_node:nodeb` ran. Not a test module itself (no `test_` prefix)."""

import json
import os
import subprocess
import sys
import time

from services.agent.rayjoin import ray_worker_spec
from shared.config import load_settings
from tests.integration.private_net import connect_ray

BIN = os.path.dirname(sys.executable)


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    temp = sys.argv[1]
    os.makedirs(temp, exist_ok=True)
    token = os.path.join(temp, "ray-token")  # what `magi cluster init` writes for every node
    with open(token, "w") as out:
        out.write("magi-probe-token-0123456789abcdef\n")
    os.environ["RAY_AUTH_MODE"] = "token"  # the head, this driver and the worker all authenticate
    os.environ["RAY_AUTH_TOKEN_PATH"] = token
    env = dict(os.environ)
    # `--block` heads and workers stop their own processes on SIGTERM; never `ray stop`, which would
    # kill every Ray process on the machine (the test session's inference service among them).
    head = subprocess.Popen([f"{BIN}/ray", "start", "--block", "--head", "--node-ip-address", "127.0.0.1",
                             "--port", "6390", "--num-cpus", "1", "--include-dashboard=false",
                             "--disable-usage-stats", "--temp-dir", temp,
                             "--resources", json.dumps({"magi_node:head": 1000})],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = load_settings({"MAGI_RAY_JOIN": "127.0.0.1:6390", "MAGI_CLUSTER_ADDRESS": "127.0.0.1"})
    spec = ray_worker_spec(settings, "nodeb")
    worker = None
    try:
        import ray

        connect_ray(ray, "127.0.0.1:6390")
        worker = subprocess.Popen(spec.command, env={**env, **spec.env, "MAGI_NODE_NAME": "nodeb"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "magi_node:nodeb" not in ray.cluster_resources() and time.monotonic() < deadline:
            time.sleep(0.5)

        @ray.remote(num_cpus=0)
        def where() -> str:
            return os.environ.get("MAGI_NODE_NAME", "")

        ran_on = ray.get(where.options(resources={"magi_node:nodeb": 0.001}).remote(), timeout=60)
        nodes = sorted(k for k in ray.cluster_resources() if k.startswith("magi_node:"))
        print(json.dumps({"nodes": nodes, "ran_on": ran_on}))
        ray.shutdown()
    finally:
        for proc in (worker, head):
            if proc is not None:
                proc.terminate()
                proc.wait(60)


if __name__ == "__main__":
    main()

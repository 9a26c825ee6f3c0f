"""`magi cluster init` output run for real: three NATS servers (routes with mutual TLS, JetStream R3) on
loopback aliases of this machine, configured only by the files the command wrote."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import psutil
import pytest
import yaml
from nats.js.api import StreamConfig

from magi.procs import free_port, stop_tree
from shared import bus
from shared.natsauth import tls_context

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOSTS = {"alpha": "127.0.0.2", "beta": "127.0.0.3", "gamma": "127.0.0.4"}
SEED_002_NODE = {"ssh_user": "pi", "ssh_port": 22, "ssh_key_path": "~/.ssh/id_rsa", "remote_work_dir": "/home/pi/x"}


def _free_on_all(hosts) -> int:
    while True:
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.bind((host, port))
            return port
        except OSError:
            continue


def _magi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magi.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    nodes = [{"name": n, "host": h, "ram_gb": 8.0, **SEED_002_NODE} for n, h in HOSTS.items()]
    (tmp / "cluster.yaml").write_text(yaml.safe_dump({"cluster": {"name": "testlab"}, "nodes": nodes}))
    ports = {"nats": _free_on_all(HOSTS.values()), "route": _free_on_all(HOSTS.values())}
    args = ["cluster", "init", str(tmp / "out"), "--config", str(tmp / "cluster.yaml"), "--nats", "alpha,beta,gamma",
            "--etc", str(tmp / "out" / "nodes" / "{node}"), "--state", str(tmp / "state" / "{node}"),
            "--nats-port", str(ports["nats"]), "--route-port", str(ports["route"]), "--monitor-port", "0"]
    out = _magi(*args)
    assert out.returncode == 0, out.stderr
    ports["args"] = args
    return tmp, ports, out.stdout


@pytest.fixture(scope="module")
def servers(material):
    tmp, ports, _ = material
    procs = {}
    for node in HOSTS:
        conf = tmp / "out" / "nodes" / node / "nats.conf"
        log = open(tmp / f"{node}.log", "ab")
        procs[node] = psutil.Popen([str(Path(sys.executable).parent / "nats-server"), "-c", str(conf)],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        for node, host in HOSTS.items():
            deadline = time.monotonic() + 15
            while socket.socket().connect_ex((host, ports["nats"])) != 0:
                assert time.monotonic() < deadline and procs[node].poll() is None, (tmp / f"{node}.log").read_text()
                time.sleep(0.05)
        yield procs
    finally:
        for proc in procs.values():
            stop_tree(proc.pid, grace=5)


def _url(ports, host="127.0.0.2") -> str:
    return f"tls://{host}:{ports['nats']}"


async def _connect(material, seed: str, **options):
    tmp, ports, _ = material
    options.setdefault("tls", tls_context(str(tmp / "out" / "operator" / "ca.pem")))
    return await nats.connect([_url(ports, h) for h in HOSTS.values()], nkeys_seed=seed, connect_timeout=3,
                              max_reconnect_attempts=0, allow_reconnect=False, error_cb=bus.on_error, **options)


def test_seed_002_ssh_fields_are_read_and_reported_unused(material):
    _, _, stdout = material
    assert stdout.count("ssh_user, ssh_port, ssh_key_path, remote_work_dir read but not used") == 3


def test_secrets_are_private_and_a_rerun_keeps_every_key(material):
    tmp, ports, _ = material
    out = tmp / "out"
    private = [*out.glob("secrets/*"), *out.glob("nodes/*/credentials/*"), *out.glob("nodes/*/magi.env"),
               out / "ca" / "ca-key.pem", *out.glob("nodes/*/tls/*-key.pem"), *out.glob("operator/*.nk"),
               out / "operator" / "api_key"]
    assert len(private) > 20
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private)
    assert {p.name for p in (out / "nodes" / "beta" / "credentials").iterdir()} == {"agent.nk", "ray-token"}
    head = {p.name for p in (out / "nodes" / "alpha" / "credentials").iterdir()}
    assert {"gateway.nk", "api_keys", "gateway-key.pem"} <= head
    assert not list(out.glob("nodes/*/tls/gateway-key.pem"))  # the key travels only as a credential
    before = {p: p.read_bytes() for p in [*out.glob("secrets/*"), out / "ca" / "ca.pem",
                                          out / "nodes" / "alpha" / "tls" / "gateway.pem"]}
    rerun = _magi(*ports["args"])
    assert rerun.returncode == 0, rerun.stderr
    assert all(p.read_bytes() == data for p, data in before.items())


def test_node_environment_names_the_cluster(material):
    tmp, ports, _ = material
    env = dict(line.split("=", 1) for line in (tmp / "out" / "nodes" / "beta" / "magi.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["MAGI_CLUSTER_ADDRESS"] == "127.0.0.3" and env["MAGI_NODE_NAME"] == "beta"
    assert env["MAGI_NATS_URL"] == ",".join(_url(ports, h) for h in HOSTS.values())
    assert env["RAY_AUTH_MODE"] == "token" and env["MAGI_RAY_JOIN"].startswith("127.0.0.2:")
    assert env["MAGI_STREAM_REPLICAS"] == "3"
    assert "MAGI_HTTP_HOST" not in env  # only the head runs the gateway


def _env_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def _get(url: str, context: ssl.SSLContext | None, key: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_heads_gateway_serves_https_on_the_cluster_address_with_its_keys(material, servers):
    """The gateway started as its systemd unit would (magi.env plus the drop-in's credentials) answers HTTPS
    that the operator's CA verifies, refuses plain HTTP, and wants the operator's key."""
    tmp, ports, _ = material
    node = tmp / "out" / "nodes" / "alpha"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAGI_", "RAY_"))}
    env.update(_env_of(node / "magi.env"))
    port = _free_on_all([HOSTS["alpha"]])
    env.update(MAGI_NATS_CREDS=str(node / "credentials" / "gateway.nk"), MAGI_HTTP_PORT=str(port),
               MAGI_HTTP_TLS_KEY=str(node / "credentials" / "gateway-key.pem"),
               MAGI_API_KEYS_FILE=str(node / "credentials" / "api_keys"), MAGI_HOME=str(tmp / "gw-home"))
    assert env["MAGI_HTTP_HOST"] == HOSTS["alpha"]
    log = open(tmp / "gateway.log", "ab")
    proc = psutil.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"https://{HOSTS['alpha']}:{port}"
    ca = str(tmp / "out" / "operator" / "ca.pem")
    key = (tmp / "out" / "operator" / "api_key").read_text().strip()
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex((HOSTS["alpha"], port)) != 0:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp / "gateway.log").read_text()
            time.sleep(0.1)
        verified = ssl.create_default_context(cafile=ca)
        assert _get(f"{base}/health", verified) == (200, {"status": "ok"})
        assert _get(f"{base}/v1/models", verified)[0] == 401
        # Authorized; with no inference service in this cluster the bus has no responder: 503, not 401.
        assert _get(f"{base}/v1/models", verified, key)[0] == 503
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
            _get(f"http://{HOSTS['alpha']}:{port}/health", None)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(f"{base}/health", ssl.create_default_context())  # the system's CAs do not vouch for it
        listening = {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {HOSTS["alpha"]}, listening
    finally:
        stop_tree(proc.pid, grace=10)


async def test_three_servers_form_a_cluster_with_r3_streams(material, servers):
    admin = await _connect(material, str(material[0] / "out" / "operator" / "admin.nk"))
    try:
        js = admin.jetstream()
        deadline = time.monotonic() + 20
        while True:  # the JetStream meta leader is elected a moment after the routes connect
            try:
                info = await js.add_stream(StreamConfig(name="R3TEST", subjects=["r3.test"], num_replicas=3))
                break
            except Exception:
                assert time.monotonic() < deadline, "no R3 stream within 20 s"
                await asyncio.sleep(0.5)
        assert info.config.num_replicas == 3
        ack = await js.publish("r3.test", b"kept on three servers")
        assert ack.stream == "R3TEST"
    finally:
        await admin.close()


async def test_plaintext_anonymous_and_unknown_clients_are_refused(material, servers):
    tmp, ports, _ = material
    seed = str(tmp / "out" / "operator" / "client.nk")
    with pytest.raises(Exception):  # no TLS: the server requires it
        await nats.connect(f"nats://127.0.0.2:{ports['nats']}", nkeys_seed=seed, connect_timeout=2,
                           max_reconnect_attempts=0, allow_reconnect=False, error_cb=bus.on_error)
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(_url(ports), tls=tls_context(str(tmp / "out" / "operator" / "ca.pem")), connect_timeout=2,
                           max_reconnect_attempts=0, allow_reconnect=False, error_cb=bus.on_error)
    client = await _connect(material, seed)
    try:
        refused = []

        async def note(exc):
            refused.append(str(exc))

        client._error_cb = note
        await client.subscribe("magi.sched.>")
        await client.publish("magi.node.alpha.heartbeat", b"{}")
        await client.flush()
        await asyncio.sleep(0.3)
        assert any('subscription to "magi.sched.>"' in r for r in refused), refused
        assert any('publish to "magi.node.alpha.heartbeat"' in r for r in refused), refused
    finally:
        await client.close()


def test_servers_listen_only_on_their_cluster_address(material, servers):
    for node, proc in servers.items():
        addresses = {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert addresses == {HOSTS[node]}, (node, addresses)


def test_unknown_head_or_two_nats_servers_are_refused(material):
    tmp, _, _ = material
    for extra in (["--head", "nosuch"], ["--nats", "alpha,beta"]):
        out = _magi("cluster", "init", str(tmp / "bad"), "--config", str(tmp / "cluster.yaml"), *extra)
        assert out.returncode == 2 and "magi cluster init:" in out.stderr
    assert not os.path.exists(tmp / "bad")

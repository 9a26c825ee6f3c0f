"""The agent's process supervisor with real processes."""

import asyncio
import sys

import psutil
import pytest

from protos.sched import InstanceSpec
from services.agent import supervisor as sup
from services.agent.policy import AgentPolicy

pytestmark = pytest.mark.integration

SLEEPER = [sys.executable, "-c", "import time; print('hello from instance', flush=True); time.sleep(120)"]


def spec(iid, command, restart="on-failure"):
    return InstanceSpec(instance_id=iid, ram_gb=0.1, command=command, restart=restart)


async def until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def published():
    return []


@pytest.fixture
async def supervisor(tmp_path, published):
    async def publish(subject, data, headers=None):
        published.append((subject, data))

    s = sup.Supervisor("n1", tmp_path, publish, AgentPolicy(programs=[sys.executable], env=["EXP_*"]))
    yield s
    await s.stop_all()


async def test_starts_logs_and_fences(supervisor, published, tmp_path):
    await supervisor.reconcile([spec("a", SLEEPER)], epoch=3)
    [status] = supervisor.statuses()
    assert status.state == "running" and status.epoch == 3 and psutil.pid_exists(status.pid)
    await until(lambda: published)
    assert published[0] == ("magi.node.n1.logs.a", b"hello from instance")
    assert (tmp_path / "instances" / "a.log").read_bytes() == b"hello from instance\n"
    pid = status.pid
    await supervisor.reconcile([], epoch=4)  # no longer assigned here: stopped at once
    assert supervisor.statuses() == []
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_clean_exit_is_not_restarted_on_failure_policy(supervisor):
    await supervisor.reconcile([spec("once", [sys.executable, "-c", "pass"])], epoch=1)
    await until(lambda: supervisor.statuses()[0].state == "exited")
    assert supervisor.statuses()[0].restarts == 0 and supervisor.statuses()[0].exit_code == 0


async def test_crash_loop_is_backed_off_then_reported(supervisor, monkeypatch):
    monkeypatch.setattr(sup, "BACKOFF_BASE_S", 0.01)
    await supervisor.reconcile([spec("bad", [sys.executable, "-c", "raise SystemExit(3)"], restart="always")], epoch=1)
    await until(lambda: supervisor.statuses()[0].state == "crashloop", timeout=20)
    status = supervisor.statuses()[0]
    assert status.restarts == sup.CRASHLOOP_FAILURES - 1 and status.exit_code == 3


async def test_missing_program_is_refused_without_crashing_the_agent(supervisor):
    await supervisor.reconcile([spec("nope", ["/nonexistent/program"], restart="never")], epoch=1)
    status = supervisor.statuses()[0]
    assert status.state == "refused" and "not found" in status.reason and status.pid is None


async def test_a_program_the_policy_does_not_list_is_refused_never_run(supervisor, tmp_path):
    marker = tmp_path / "pwned"
    await supervisor.reconcile([spec("evil", ["sh", "-c", f"touch {marker}"], restart="always")], epoch=1)
    await asyncio.sleep(0.3)
    status = supervisor.statuses()[0]
    assert status.state == "refused" and "is not allowed by" in status.reason and status.pid is None
    assert not marker.exists()


async def test_an_environment_variable_the_policy_does_not_list_is_refused(supervisor):
    bad = InstanceSpec(instance_id="ld", ram_gb=0.1, command=SLEEPER, env={"LD_PRELOAD": "/tmp/evil.so"})
    await supervisor.reconcile([bad], epoch=1)
    status = supervisor.statuses()[0]
    assert status.state == "refused" and "LD_PRELOAD" in status.reason


async def test_instances_inherit_none_of_the_agents_environment(supervisor, published, monkeypatch):
    monkeypatch.setenv("MAGI_NATS_CREDS", "/etc/magi/agent.nk")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    show = [sys.executable, "-c", "import os, json; print(json.dumps(sorted(os.environ)), flush=True)"]
    inst = InstanceSpec(instance_id="env", ram_gb=0.1, command=show, env={"EXP_SEED": "7"}, restart="never")
    await supervisor.reconcile([inst], epoch=1)
    await until(lambda: published)
    names = set(__import__("json").loads(published[0][1]))
    assert {"EXP_SEED", "MAGI_INSTANCE_ID", "MAGI_NODE_NAME", "PATH"} <= names
    assert not names & {"MAGI_NATS_CREDS", "AWS_SECRET_ACCESS_KEY"}


async def test_placement_only_instance_is_reserved(supervisor):
    await supervisor.reconcile([spec("res", [])], epoch=1)
    assert supervisor.statuses()[0].state == "reserved"


STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(120)"]


async def test_stubborn_instances_are_stopped_together_not_one_after_another(supervisor, published, monkeypatch):
    monkeypatch.setattr(sup, "STOP_GRACE_S", 1.0)
    await supervisor.reconcile([spec("s1", STUBBORN), spec("s2", STUBBORN), spec("s3", STUBBORN)], epoch=1)
    await until(lambda: len(published) == 3)  # each has its SIGTERM handler in place
    pids = [s.pid for s in supervisor.statuses()]
    started = asyncio.get_running_loop().time()
    await supervisor.reconcile([], epoch=2)
    took = asyncio.get_running_loop().time() - started
    assert 1.0 <= took < 1.9, took  # one grace period for all three, then SIGKILL
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


async def test_instances_are_told_their_epoch_and_id(tmp_path, published):
    async def publish(subject, data, headers=None):
        published.append((subject, data))

    show = [sys.executable, "-c", "import os; print(os.environ['MAGI_EPOCH'], os.environ['MAGI_INSTANCE_ID'], "
            "flush=True)"]
    own = InstanceSpec(instance_id="own", ram_gb=0.0, command=show, restart="never")
    s = sup.Supervisor("n1", tmp_path, publish, AgentPolicy(programs=[sys.executable]), own=[own])
    try:
        await s.reconcile([spec("assigned", show, restart="never"), own], epoch=7)
        await until(lambda: len(published) == 2)
        assert sorted(data for _, data in published) == [b"7 assigned", b"7 own"]
    finally:
        await s.stop_all()

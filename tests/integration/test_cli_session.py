"""The `magi` CLI against the session stack: found through --home alone, JSON that parses, interactive chat."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _magi(magi_stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`magi` as a user runs it with nothing but --home: no MAGI_NATS_URL, no MAGI_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAGI_NATS_URL", "MAGI_HOME")}
    return subprocess.run([sys.executable, "-m", "magi.cli", *args, "--home", magi_stack.home], env=env,
                          input=stdin, capture_output=True, text=True, timeout=150)


def test_status_finds_the_stack_through_home_and_exits_0(magi_stack):
    out = _magi(magi_stack, "status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "magi-orchestrator" in out.stdout and "not answering" not in out.stdout
    report = json.loads(_magi(magi_stack, "status", "--json").stdout)
    assert report["ok"] is True and report["nats_url"] == magi_stack.nats_url and report["missing"] == []
    assert {"magi-agent", "magi-scheduler", "magi-inference", "magi-gateway"} <= {s["name"] for s in report["services"]}
    assert {p["name"] for p in report["processes"]} >= {"nats", "redis", "postgres", "keeper"}


@pytest.mark.parametrize(("args", "key"), [
    (["nodes"], "nodes"), (["models"], "models"), (["report"], "total_nodes"),
    (["memory", "list", "--limit", "2"], "documents"), (["history", "--node", "testnode", "-k", "1"], "node"),
])
def test_read_commands_print_json_that_parses(magi_stack, args, key):
    out = _magi(magi_stack, *args, "--json")
    assert out.returncode == 0, out.stderr
    assert key in json.loads(out.stdout)


def test_tables_list_nodes_and_the_report(magi_stack):
    nodes = _magi(magi_stack, "nodes")
    assert nodes.returncode == 0 and "testnode" in nodes.stdout and "HEALTHY" in nodes.stdout
    report = _magi(magi_stack, "report")
    assert report.returncode == 0 and "testnode" in report.stdout and "nodes," in report.stdout


def test_interactive_chat_runs_commands_and_never_sends_them_to_the_model(magi_stack):
    script = "/models\n/nosuch\nSay hello.\n/status\n/quit\nThis line is never read.\n"
    out = _magi(magi_stack, "chat", "--max-tokens", "8", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m/0" in out.stdout and "ready" in out.stdout  # /models printed the replicas table
    assert "unknown command /nosuch" in out.stderr
    assert out.stderr.count(" tokens, ") == 1  # one answer: "Say hello." and nothing else reached the model
    assert "magi-inference" in out.stdout  # /status after the answer
    assert "Traceback" not in out.stderr


def test_interactive_chat_keeps_the_conversation(magi_stack):
    out = _magi(magi_stack, "chat", "--max-tokens", "4", stdin="Hi.\nAgain.\n/reset\nOnce more.\nquit\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(" tokens, ") == 3 and "(conversation forgotten)" in out.stderr

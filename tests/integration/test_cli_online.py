"""The `magi` CLI against the running stack, as a user runs it from a shell."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _magi(magi_stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGI_NATS_URL": magi_stack.nats_url, "MAGI_HOME": magi_stack.home}
    return subprocess.run([sys.executable, "-m", "magi.cli", *args], env=env, capture_output=True, text=True,
                          timeout=100)


def test_chat_streams_the_answer_and_exits_cleanly(magi_stack):
    out = _magi(magi_stack, "chat", "Say hello.", "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "Traceback" not in out.stderr and "exception" not in out.stderr.lower()
    assert "tokens" in out.stderr  # the replica/tokens/latency footer


def test_mission_shows_each_clone_as_it_finishes(magi_stack):
    out = _magi(magi_stack, "mission", "Name a colour.", "-v", "in one word", "-v", "in one line",
                "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("[") >= 2 and "clone var0" in out.stderr and "clone var1" in out.stderr
    assert "consensus" in out.stdout and "Traceback" not in out.stderr


def test_a_named_mission_runs_once_and_its_result_is_read_back_by_id(magi_stack):
    import json

    ran = _magi(magi_stack, "mission", "Name a colour.", "-v", "in one word", "--max-tokens", "8",
                "--id", "cli-named-1", "--json")
    again = _magi(magi_stack, "mission", "Something else entirely.", "--id", "cli-named-1", "--json")
    assert ran.returncode == 0 and again.returncode == 0, ran.stderr + again.stderr
    first, second = json.loads(ran.stdout), json.loads(again.stdout)
    assert second == first  # the same id never runs twice: the stored reply comes back
    read = _magi(magi_stack, "result", "cli-named-1", "--json")
    assert read.returncode == 0 and json.loads(read.stdout) == first
    unknown = _magi(magi_stack, "result", "never-submitted")
    assert unknown.returncode != 0 and "no result for mission never-submitted" in unknown.stdout + unknown.stderr


def test_models_table_lists_replicas(magi_stack):
    out = _magi(magi_stack, "models")
    assert out.returncode == 0 and "smollm2-135m/0" in out.stdout and "ready" in out.stdout

"""The `magi` CLI against the running stack, as a user runs it from a shell."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _magi(magi_stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGI_NATS_URL": magi_stack.nats_url, "MAGI_HOME": magi_stack.home}
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True,
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


def test_models_table_lists_replicas(magi_stack):
    out = _magi(magi_stack, "models")
    assert out.returncode == 0 and "smollm2-135m/0" in out.stdout and "ready" in out.stdout

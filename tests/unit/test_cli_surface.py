"""The CLI's surface with no stack running: exit codes, options every command shares, --home, completion."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from magi import cli, stack
from magi.procs import free_port
from magi.table import render
from shared import errors

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MAGI = [sys.executable, "-m", "magi.cli"]


def _magi(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MAGI, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("error", "code"), [
    (errors.BadRequest("x"), 2), (errors.Forbidden("x"), 2), (errors.PayloadTooLarge("x"), 1),
    (errors.NotFound("x"), 1), (errors.Unprocessable("x"), 1), (errors.Internal("x"), 1), (errors.StackError("x"), 1),
    (errors.Unavailable("x"), 3), (errors.DeadlineExceeded("x"), 3),
])
def test_each_typed_error_has_its_exit_code(error, code):
    assert cli.exit_code(error) == code
    # and a service's reply carrying the error's code maps the same way
    assert cli.exit_code(errors.from_reply(str(error.code), "x", b"{}")) == code


# The positional arguments each command needs to parse.
POSITIONALS = {"logs": ["node1"], "mission": ["hi"], "result": ["m1"], "memory": ["search", "q"],
               "drain": ["n"], "undrain": ["n"], "place": ["--config", "c.yaml", "--instances", "i.yaml"]}


@pytest.mark.parametrize("command", cli.READ_COMMANDS)
def test_every_read_command_takes_json_and_the_bus_options(command):
    args = cli.build_parser().parse_args([command, *POSITIONALS.get(command, []), "--json", "--nats-url",
                                          "nats://h:4999", "--role", "client", "--home", "/tmp/h"])
    assert args.json is True and args.nats_url == "nats://h:4999" and args.bus_role == "client"
    assert args.home == "/tmp/h"


def test_every_command_takes_the_bus_options():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        options = {o for action in sub._actions for o in action.option_strings}
        assert {"--home", "--nats-url", "--role"} <= options, name


def test_version_and_usage_errors():
    out = _magi("--version")
    assert out.returncode == 0 and out.stdout.strip().startswith("magi ") and out.stdout.split()[1][0].isdigit()
    bad = _magi("nodes", "--no-such-option")
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
    missing = _magi("memory", "add")
    assert missing.returncode == 2 and "give the text" in missing.stderr


def test_status_exits_3_when_the_bus_is_unreachable(tmp_path):
    port = free_port()  # nothing listens there
    out = _magi("status", "--nats-url", f"nats://127.0.0.1:{port}", "--home", str(tmp_path))
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"cannot reach NATS at nats://127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr
    as_json = _magi("status", "--json", "--nats-url", f"nats://127.0.0.1:{port}", "--home", str(tmp_path))
    report = __import__("json").loads(as_json.stdout)
    assert as_json.returncode == 3 and report["ok"] is False and "magi-orchestrator" in report["missing"]
    nodes = _magi("nodes", "--nats-url", f"nats://127.0.0.1:{port}", "--home", str(tmp_path))
    assert nodes.returncode == 3 and "cannot reach NATS" in nodes.stderr


def test_home_gives_network_commands_the_stack_url_recorded_there(tmp_path, monkeypatch):
    monkeypatch.delenv("MAGI_NATS_URL", raising=False)
    cfg = stack.StackConfig(home=tmp_path, nats_port=4999)
    stack.save_state(cfg, stack.StackState(home=str(tmp_path), nats_url="nats://127.0.0.1:4999", redis_url="",
                                           pg_dsn="", pgdata=""))
    parse = cli.build_parser().parse_args
    assert cli._settings(parse(["nodes", "--home", str(tmp_path)])).nats_url == "nats://127.0.0.1:4999"
    assert cli._settings(parse(["nodes", "--home", str(tmp_path)])).home == str(tmp_path)
    explicit = parse(["nodes", "--home", str(tmp_path), "--nats-url", "nats://elsewhere:4222"])
    assert cli._settings(explicit).nats_url == "nats://elsewhere:4222"
    monkeypatch.setenv("MAGI_NATS_URL", "nats://fromenv:4222")
    assert cli._settings(parse(["nodes", "--home", str(tmp_path)])).nats_url == "nats://fromenv:4222"
    monkeypatch.delenv("MAGI_NATS_URL")
    assert cli._settings(parse(["up", "--home", str(tmp_path)])).nats_url == "nats://127.0.0.1:4222"  # up picks its own
    assert cli._settings(parse(["nodes", "--home", str(tmp_path / "empty")])).nats_url == "nats://127.0.0.1:4222"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_name_magi(shell):
    out = _magi("completion", shell)
    assert out.returncode == 0 and "magi" in out.stdout
    assert {"bash": "complete ", "zsh": "#compdef magi", "fish": "complete --command magi"}[shell] in out.stdout


def test_bash_completion_completes_commands_and_options(tmp_path):
    magi = Path(sys.executable).parent / "magi"
    if not magi.exists() or not shutil.which("bash"):
        pytest.skip("needs the installed `magi` entry point and bash")
    script = tmp_path / "magi.bash"
    script.write_text(_magi("completion", "bash").stdout)

    def complete(line: str) -> set[str]:
        words = line.split(" ")
        shell = (f"source {script}; COMP_LINE='{line}'; COMP_POINT={len(line)}; COMP_WORDS=({' '.join(words)}); "
                 f"COMP_CWORD={len(words) - 1}; _python_argcomplete magi; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PATH": f"{magi.parent}:{os.environ['PATH']}"})
        return {w.strip() for w in out.stdout.splitlines() if w.strip()}

    assert complete("magi lo") == {"logs"}
    assert complete("magi chat --model-r") == {"--model-role"}
    assert complete("magi memory s") == {"search"}


def test_tables_keep_whole_rows_when_piped():
    text = render(["model", "replica", "note"], [["smollm2-135m", "smollm2-135m/0", "x" * 300], ["[b]m[/b]", "-", ""]])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "replica", "note"] and set(lines[1].strip()) <= set("─-")
    assert "smollm2-135m/0" in lines[2] and "x" * 300 in lines[2]  # nothing wrapped or cut at 80 columns
    assert lines[3].startswith("[b]m[/b]")  # cell text is not markup

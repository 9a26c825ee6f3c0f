"""The llama.cpp build shows its progress and elapsed time, and fails loudly with the end of its log.

The real build takes 15 minutes; these drive the progress reader and install-llama-cpp.sh with a
captured-shape build log from a stand-in `pip`.
"""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SCRIPTS = Path(__file__).resolve().parents[2] / "deploy" / "scripts"
READER = SCRIPTS / "build-progress.py"

# The shape of `pip wheel -v llama-cpp-python` output: pip's lines, CMake configuring, then ninja's steps.
BUILD_LOG = "\n".join([
    "Using pip 24.0 from /x/pip (python 3.11)",
    "  Building wheel for llama-cpp-python (pyproject.toml): started",
    "  *** scikit-build-core 0.10.7 using CMake 3.31.1 (wheel)",
    "  -- The C compiler identification is GNU 12.2.0",
    *[f"  [{i}/40] Building CXX object vendor/llama.cpp/src/CMakeFiles/llama.dir/llama-{i}.cpp.o" for i in range(1, 41)],
    "  *** Created llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl",
]) + "\n"


def _read(text: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(READER), str(tmp_path / "build.log"), *args], input=text.encode(),
                          capture_output=True, timeout=30)


def test_steps_become_progress_lines_and_the_log_keeps_everything(tmp_path):
    out = _read(BUILD_LOG, tmp_path)
    assert out.returncode == 0
    lines = out.stderr.decode().splitlines()
    progress = [line for line in lines if line.startswith("building: ")]
    # Piped, one line per tenth of the way (not 40 lines), each with the step count and elapsed time.
    assert [p.split(",")[0] for p in progress] == [
        "building: 1/40 steps (2%)", "building: 4/40 steps (10%)", "building: 8/40 steps (20%)",
        "building: 12/40 steps (30%)", "building: 16/40 steps (40%)", "building: 20/40 steps (50%)",
        "building: 24/40 steps (60%)", "building: 28/40 steps (70%)", "building: 32/40 steps (80%)",
        "building: 36/40 steps (90%)", "building: 40/40 steps (100%)"]
    assert all(p.endswith("s elapsed") for p in progress)
    assert lines[-1].startswith("build output ended after ")
    assert (tmp_path / "build.log").read_text() == BUILD_LOG


def test_make_style_percentages_count_too(tmp_path):
    out = _read("[  5%] Building C object a.o\n[ 55%] Building C object b.o\n[100%] Linking\n", tmp_path)
    progress = [line.split(",")[0] for line in out.stderr.decode().splitlines() if line.startswith("building")]
    assert progress == ["building: 5% (5%)", "building: 55% (55%)", "building: 100% (100%)"]


def test_a_silent_build_gets_a_heartbeat_with_the_elapsed_time(tmp_path):
    producer = "import sys, time; print('[1/10] a', flush=True); time.sleep(1.5); print('[2/10] b', flush=True)"
    with subprocess.Popen([sys.executable, "-c", producer], stdout=subprocess.PIPE) as source:
        out = subprocess.run([sys.executable, str(READER), str(tmp_path / "build.log"), "--every", "0.4"],
                             stdin=source.stdout, capture_output=True, timeout=30)
    lines = [line for line in out.stderr.decode().splitlines() if line.startswith("building: 1/10 steps")]
    assert len(lines) >= 3, out.stderr  # the step itself, then heartbeats while nothing came
    seconds = int(lines[-1].rsplit(", ", 1)[1].removesuffix("s elapsed"))
    assert 1 <= seconds <= 10, lines  # the heartbeat counts the silence


def _fake_venv(tmp_path: Path, build_exit: int) -> Path:
    """A venv bin folder whose `pip` prints the build log (then fails or writes a wheel) and records installs."""
    bin_dir = tmp_path / "venv-bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (tmp_path / "build.txt").write_text(BUILD_LOG + ("  ninja: build stopped: subcommand failed.\n" if build_exit else ""))
    pip = bin_dir / "pip"
    pip.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> {tmp_path}/pip-calls
        if [ "$1" = wheel ]; then
            cat {tmp_path}/build.txt
            [ {build_exit} -eq 0 ] || exit {build_exit}
            while [ "$1" != -w ]; do shift; done
            touch "$2/llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
        fi
        """))
    pip.chmod(pip.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _install(tmp_path: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGI_WHEELHOUSE": str(tmp_path / "wheels")}
    return subprocess.run(["bash", str(SCRIPTS / "install-llama-cpp.sh"), str(bin_dir)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_install_script_shows_progress_and_keeps_the_wheel(tmp_path):
    out = _install(tmp_path, _fake_venv(tmp_path, build_exit=0))
    assert out.returncode == 0, out.stderr
    assert "building: 40/40 steps (100%)" in out.stderr and "built llama-cpp-python in" in out.stderr
    (wheel,) = (tmp_path / "wheels").glob("llama-cpp-python-*/llama_cpp_python-*.whl")
    calls = (tmp_path / "pip-calls").read_text().splitlines()
    assert calls[0].startswith("wheel -v --no-deps") and calls[-1] == f"install --quiet {wheel}"
    again = _install(tmp_path, tmp_path / "venv-bin")  # the cached wheel: no second build
    assert again.returncode == 0 and "building" not in again.stderr


def test_a_failed_build_fails_loudly_with_the_end_of_its_log(tmp_path):
    out = _install(tmp_path, _fake_venv(tmp_path, build_exit=1))
    assert out.returncode != 0
    assert "llama-cpp-python build failed after" in out.stderr
    assert "ninja: build stopped: subcommand failed." in out.stderr  # the tail of the log, not just "failed"
    assert not list((tmp_path / "wheels").glob("llama-cpp-python-*/*.whl"))
    assert not any("install" in call.split()[0] for call in (tmp_path / "pip-calls").read_text().splitlines())

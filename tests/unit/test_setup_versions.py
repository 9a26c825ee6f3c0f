"""The Python versions MAGI supports, said in four places (pyproject.toml, the justfile's setup, the README's
prerequisites, ruff's target), agree; and `just setup` picks, refuses and rebuilds .venv as the README says."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
JUSTFILE = (ROOT / "justfile").read_text()
README = (ROOT / "README.md").read_text()


def minor_versions(versions):
    return sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def from_pyproject() -> list[str]:
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    return minor_versions(f"3.{m}" for m in range(0, 40) if spec.contains(f"3.{m}.0"))


def from_classifiers() -> list[str]:
    prefix = "Programming Language :: Python :: "
    found = (c[len(prefix):] for c in PYPROJECT["project"]["classifiers"] if c.startswith(prefix))
    return minor_versions(v for v in found if re.fullmatch(r"3\.\d+", v))


def from_justfile() -> list[str]:
    m = re.search(r'^\s*supported="([^"]*)"', JUSTFILE, re.M)
    assert m, "the setup recipe names its versions in one line: supported=\"3.11 3.12\""
    return minor_versions(m.group(1).split())


def two_commands_section() -> str:
    m = re.search(r"^## Two commands\n(.*?)^## ", README, re.M | re.S)
    assert m, "README has a '## Two commands' section"
    return m.group(1)


def from_readme() -> list[str]:
    m = re.search(r"MAGI runs on Linux with Python (3\.\d+(?:(?:, | or | and )3\.\d+)*)", two_commands_section())
    assert m, "the README's prerequisites say 'MAGI runs on Linux with Python 3.x or 3.y'"
    return minor_versions(re.findall(r"3\.\d+", m.group(1)))


def test_requires_python_justfile_readme_and_classifiers_agree():
    supported = from_pyproject()
    assert supported == ["3.11", "3.12"]
    assert from_justfile() == supported, "justfile setup's supported= differs from requires-python"
    assert from_readme() == supported, "README's prerequisites differ from requires-python"
    assert from_classifiers() == supported, "pyproject classifiers differ from requires-python"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + supported[0].replace(".", "")


def test_this_interpreter_is_one_of_them():
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in from_pyproject()


def test_instructions_only_ever_install_a_supported_python():
    supported = set(from_pyproject())
    text = two_commands_section() + JUSTFILE
    named = re.findall(r"PYTHON=\S*?python(3\.\d+)", text) + re.findall(r"uv python install (3\.\d+)", text)
    assert named, "the README and the setup recipe say how to pick or install a Python"
    assert set(named) <= supported, named


# `just setup` itself, run on the real justfile with stand-in interpreters: each answers the version probe the
# recipe makes, creates a venv holding a copy of itself, and has a pip that stops the recipe, so nothing installs.

FAKE_PYTHON = """#!/bin/sh
case "$1" in
  -c) echo {ver} ;;
  -VV) echo "Python {ver}.0 (stand-in)" ;;
  -m) [ "$2" = venv ] || exit 2
      mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
      printf '#!/bin/sh\\necho "pip reached with {ver}"\\nexit 42\\n' > "$3/bin/pip" && chmod +x "$3/bin/pip" ;;
  *) exit 2 ;;
esac
"""


def just_binary() -> str:
    found = shutil.which("just") or shutil.which("just", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("no `just` on PATH or beside this Python (rust-just is a dev dependency)")
    return found


def fake_python(where: Path, ver: str) -> Path:
    path = where / f"fakepython{ver}"
    path.write_text(FAKE_PYTHON.format(ver=ver))
    path.chmod(0o755)
    return path


def run_setup(workdir: Path, python: str | None) -> subprocess.CompletedProcess:
    for name in ("pyproject.toml", "justfile"):
        shutil.copy(ROOT / name, workdir / name)
    (workdir / "deploy" / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "deploy/scripts/install-llama-cpp.sh", workdir / "deploy/scripts/install-llama-cpp.sh")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    if python is not None:
        env["PYTHON"] = python
    return subprocess.run([just_binary(), "--justfile", str(workdir / "justfile"), "--working-directory",
                           str(workdir), "setup"], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("ver", ["3.13", "3.10"])
def test_setup_refuses_an_unsupported_python_and_says_how_to_get_one(tmp_path, ver):
    out = run_setup(tmp_path, str(fake_python(tmp_path, ver)))
    assert out.returncode == 1, out.stderr
    assert f"MAGI needs Python 3.11 or 3.12; {tmp_path}/fakepython{ver} is {ver}" in out.stderr
    assert "sudo apt install python3 python3-venv" in out.stderr and "uv python install 3.12" in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_refuses_a_python_that_is_not_there(tmp_path):
    out = run_setup(tmp_path, "python3.99-nowhere")
    assert out.returncode == 1
    assert "python3.99-nowhere is not runnable" in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_python_312_rebuilds_a_venv_made_by_311(tmp_path):
    fake_python(tmp_path, "3.11")
    subprocess.run([str(tmp_path / "fakepython3.11"), "-m", "venv", str(tmp_path / ".venv")], check=True)
    (tmp_path / ".venv" / "old-marker").touch()
    out = run_setup(tmp_path, str(fake_python(tmp_path, "3.12")))
    assert "just setup: .venv is Python 3.11" in out.stderr and "is 3.12: recreating .venv" in out.stderr
    assert not (tmp_path / ".venv" / "old-marker").exists()
    assert "pip reached with 3.12" in out.stdout + out.stderr, out.stderr
    assert out.returncode == 42


def test_without_PYTHON_setup_keeps_the_venvs_python(tmp_path):
    fake_python(tmp_path, "3.12")
    subprocess.run([str(tmp_path / "fakepython3.12"), "-m", "venv", str(tmp_path / ".venv")], check=True)
    (tmp_path / ".venv" / "old-marker").touch()
    out = run_setup(tmp_path, None)
    assert "recreating" not in out.stderr
    assert (tmp_path / ".venv" / "old-marker").exists()
    assert "pip reached with 3.12" in out.stdout + out.stderr, out.stderr


def test_the_install_stamp_holds_the_python_version(tmp_path):
    # A stamp written by a finished setup lets the next one skip reinstalling; the same files under another
    # Python (here the venv's interpreter replaced by a 3.12 one) must not match it.
    fake_python(tmp_path, "3.11")
    subprocess.run([str(tmp_path / "fakepython3.11"), "-m", "venv", str(tmp_path / ".venv")], check=True)
    files = b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "justfile",
                                                         "deploy/scripts/install-llama-cpp.sh"))
    stamp = hashlib.sha256(b"Python 3.11.0 (stand-in)\n" + files).hexdigest()[:16]
    (tmp_path / ".venv" / ".magi-installed").write_text(stamp + "\n")
    out = run_setup(tmp_path, None)
    assert out.returncode == 0 and "pip reached" not in out.stdout + out.stderr, out.stderr
    subprocess.run([str(fake_python(tmp_path, "3.12")), "-m", "venv", str(tmp_path / ".venv")], check=True)
    assert (tmp_path / ".venv" / ".magi-installed").read_text() == stamp + "\n"
    out = run_setup(tmp_path, None)
    assert "pip reached with 3.12" in out.stdout + out.stderr, out.stderr

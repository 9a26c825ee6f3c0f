"""deploy/scripts/install-llama-cpp.sh without compiling anything: a stand-in `pip` records the flags it was
asked to build with and writes a small wheel; stand-in `nvcc` and `nvidia-smi` play a CUDA machine or not."""

import hashlib
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "scripts" / "install-llama-cpp.sh"

FAKE_PIP = """#!/usr/bin/env bash
set -eu
case "$1" in
wheel)
    out=$(printf '%s\\n' "$@" | sed -n '/^-w$/{n;p}')
    echo "$CMAKE_ARGS" >> "$RECORD/builds"
    echo "${CUDACXX:-}" > "$RECORD/cudacxx"
    echo "[1/1] Linking libllama.so"
    "$(dirname "$0")/python" - "$out" <<'EOF'
import os, sys, zipfile
libs = ["llama_cpp/lib/libggml-cpu.so"]
if "GGML_CUDA=on" in os.environ["CMAKE_ARGS"] and not os.environ.get("FAKE_NO_CUDA_BACKEND"):
    libs.append("llama_cpp/lib/libggml-cuda.so")
with zipfile.ZipFile(sys.argv[1] + "/llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl", "w") as whl:
    for lib in libs:
        whl.writestr(lib, b"\\x7fELF")
EOF
    ;;
uninstall) ;;
install) echo "${@: -1}" >> "$RECORD/installed" ;;
esac
"""
FAKE_NVCC = "#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n"
NVIDIA_SMI_WITH_GPUS = """#!/bin/sh
if [ "$1" = -L ]; then printf 'GPU 0: NVIDIA H100 (UUID: GPU-a)\\nGPU 1: NVIDIA H100 (UUID: GPU-b)\\n'
else printf '9.0\\n9.0\\n'; fi
"""
NVIDIA_SMI_WITHOUT_GPUS = "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n"


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def machine(tmp_path):
    venv, tools, record = tmp_path / "venv", tmp_path / "tools", tmp_path / "record"
    for folder in (venv, tools, record):
        folder.mkdir()
    (venv / "python").symlink_to(sys.executable)
    _exe(venv / "pip", FAKE_PIP)
    _exe(tools / "nvidia-smi", NVIDIA_SMI_WITHOUT_GPUS)

    def install(gpus: bool = False, nvcc: bool = False, **env) -> subprocess.CompletedProcess:
        if nvcc:
            _exe(tools / "nvcc", FAKE_NVCC)
        _exe(tools / "nvidia-smi", NVIDIA_SMI_WITH_GPUS if gpus else NVIDIA_SMI_WITHOUT_GPUS)
        full_env = {"PATH": f"{tools}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORD": str(record),
                    "MAGI_WHEELHOUSE": str(tmp_path / "house"), **env}
        return subprocess.run(["bash", str(SCRIPT), str(venv)], env=full_env, capture_output=True, text=True,
                              timeout=60)

    install.builds = lambda: (record / "builds").read_text().splitlines() if (record / "builds").exists() else []
    install.installed = lambda: (record / "installed").read_text().splitlines()
    install.cudacxx = lambda: (record / "cudacxx").read_text().strip()
    install.tools = tools
    return install


def _key(args: str, cuda_release: str = "") -> str:
    text = f"0.3.36 {args}" + (f" cuda {cuda_release}" if cuda_release else "")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def test_cpu_build_keeps_its_flags_and_cache_key(machine):
    first = machine(nvcc=True)  # a toolkit without a GPU (this kind of machine has one): still the CPU build
    assert first.returncode == 0, first.stderr
    assert "no GPU listed by nvidia-smi" in first.stderr
    (args,) = machine.builds()
    assert "GGML_CUDA" not in args and args.startswith("-DGGML_RPC=ON")
    assert Path(machine.installed()[0]).parent.name == f"llama-cpp-python-{_key(args)}"
    again = machine()
    assert again.returncode == 0 and len(machine.builds()) == 1  # the cached wheel, not a second build


def test_cuda_build_when_a_toolkit_and_a_gpu_are_there(machine):
    cpu = machine()
    cuda = machine(nvcc=True, gpus=True)
    assert cpu.returncode == 0 and cuda.returncode == 0, cuda.stderr
    cpu_args, cuda_args = machine.builds()
    assert cuda_args == cpu_args + " -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"
    assert machine.cudacxx() == str(machine.tools / "nvcc")
    cpu_wheel, cuda_wheel = (Path(p) for p in machine.installed())
    assert cuda_wheel.parent.name == f"llama-cpp-python-{_key(cuda_args, '12.4')}" != cpu_wheel.parent.name
    assert "llama_cpp/lib/libggml-cuda.so" in zipfile.ZipFile(cuda_wheel).namelist()


def test_user_args_are_appended_and_can_turn_cuda_off(machine):
    done = machine(nvcc=True, gpus=True, MAGI_LLAMA_CMAKE_ARGS="-DGGML_CUDA=OFF -DLLAMA_CURL=OFF")
    assert done.returncode == 0, done.stderr
    (args,) = machine.builds()
    assert args.startswith("-DGGML_RPC=ON") and args.endswith(" -DGGML_CUDA=OFF -DLLAMA_CURL=OFF")
    assert "GGML_CUDA=on" not in args


def test_user_args_ask_for_cuda_without_a_gpu(machine):
    done = machine(nvcc=True, MAGI_LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89")
    assert done.returncode == 0, done.stderr
    (args,) = machine.builds()
    assert args.endswith(" -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89") and args.count("ARCHITECTURES") == 1


def test_cuda_asked_for_without_nvcc_is_refused(machine):
    if os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        pytest.skip("this machine has a CUDA toolkit in /usr/local/cuda, which the script finds")
    done = machine(MAGI_LLAMA_CMAKE_ARGS="-DGGML_CUDA=on")
    assert done.returncode != 0 and "no nvcc" in done.stderr and not machine.builds()


def test_a_cuda_build_without_its_backend_is_not_cached(machine):
    for _ in range(2):  # nothing was cached, so the second install builds again
        done = machine(nvcc=True, gpus=True, FAKE_NO_CUDA_BACKEND="1")
        assert done.returncode != 0 and "without its CUDA backend" in done.stderr
    assert len(machine.builds()) == 2 and not (machine.tools.parent / "record" / "installed").exists()

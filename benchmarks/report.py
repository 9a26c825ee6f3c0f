"""What `just bench` keeps of a run: a line in the history, plots, and the comparison with earlier runs.

- `benchmarks/results/history.jsonl`: one JSON object per run (appended, never rewritten) with the date,
  the git commit (and whether the tree had uncommitted changes), the machine (CPU model, cores, RAM, Python,
  llama-cpp-python, GPUs), the groups that ran and every metric. It is committed: the trend across commits
  and machines is what users ask about, and `just bench --compare` reads it. `latest.json` stays ignored
  (the newest run alone, for scripts).
- PNG plots in `benchmarks/results/` (matplotlib, Agg: no display needed), each stamped with the commit:
  the seed table, load curves, batched vs sequential decoding. They are committed with the README that
  shows them; a plot whose metrics the run did not produce is skipped (its older file stays, stamped with
  the commit it came from).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("magi.bench.report")

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY = RESULTS / "history.jsonl"
REPO = Path(__file__).resolve().parents[1]

SEED_ROWS = ("single", "parallel10", "memory_inference", "full_op")
# Seed 000's "Performance Expectations" table, improvement column (benchmarks/seed.py reports it too, as
# seed.<row>.seed_speedup; this is the fallback for a run that did not).
SEED_SPEEDUP = {"single": 1.1, "parallel10": 10.0, "memory_inference": 1.7, "full_op": 5.0}
CONCURRENCY = (1, 4, 16, 64)


# ---- facts about the run ---------------------------------------------------------------------------------

def git_facts(repo: Path = REPO) -> dict:
    """The commit checked out and whether the tree differs from it; empty where there is no git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "", "dirty": False}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi lists them; none where it is absent or finds no driver."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, memory = line.rpartition(",")
        if name.strip():
            gpus.append({"name": name.strip(), "memory_gb": round(float(memory) / 1024, 1) if memory.strip().isdigit()
                         else 0.0})
    return gpus


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def machine_facts() -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 1, "ram_gb": _ram_gb(), "arch": platform.machine(),
            "os": platform.platform(terse=True), "python": platform.python_version(),
            "llama_cpp_python": _version("llama-cpp-python"), "gpus": _gpus()}


def history_entry(metrics: dict[str, float], *, groups: list[str], seconds: float, failed: dict[str, str] | None = None,
                  now: dt.datetime | None = None, git: dict | None = None, machine: dict | None = None) -> dict:
    """One run: when, which commit, which machine, the groups asked for (and those that failed), the metrics."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return {"date": now.isoformat(timespec="seconds"), **(git if git is not None else git_facts()),
            "machine": machine if machine is not None else machine_facts(), "groups": list(groups),
            "failed": dict(failed or {}), "seconds": round(seconds, 1), "metrics": dict(metrics)}


# ---- history ---------------------------------------------------------------------------------------------

def append_history(entry: dict, path: Path = HISTORY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(entry) + "\n")  # metrics in the order the groups ran


def read_history(path: Path = HISTORY) -> list[dict]:
    """Every readable entry, oldest first; a damaged line (a run killed mid-write) is skipped, not fatal."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.warning("unreadable history line skipped", extra={"file": str(path), "line": number})
            continue
        if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict):
            entries.append(entry)
    return entries


def _change(old: object, new: object) -> str:
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)) or isinstance(old, bool):
        return ""
    if old == 0:
        return "" if new == 0 else "new"
    return f"{(new - old) / abs(old) * 100:+.1f}%"


def compare_rows(history: list[dict]) -> list[list[object]]:
    """Each metric of the newest entry beside its value in the nearest earlier entry that measured it (a run
    of a few groups, `--only`, is compared with the last run that had them): metric, old, new, change."""
    if not history:
        return []
    *earlier, latest = history
    rows = []
    for name, new in latest["metrics"].items():
        old = next((e["metrics"][name] for e in reversed(earlier) if name in e["metrics"]), None)
        rows.append([name, "-" if old is None else old, new, "" if old is None else _change(old, new)])
    return rows


def describe(entry: dict) -> str:
    commit = (entry.get("commit") or "no git")[:10] + (" (dirty)" if entry.get("dirty") else "")
    machine = entry.get("machine", {})
    gpus = ", ".join(g.get("name", "") for g in machine.get("gpus", []))
    return (f"{entry.get('date', '?')} commit {commit} on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
            + (f", {gpus}" if gpus else ""))


# ---- plots -----------------------------------------------------------------------------------------------

def _figure(ncols: int, width: float = 6.0):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.6), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path, stamp: str) -> Path:
    fig.text(0.01, 0.01, stamp, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Skipped(Exception):
    """A plot the run has no metrics for; says which."""


def _missing(metrics: dict, names: list[str]) -> list[str]:
    return [n for n in names if not isinstance(metrics.get(n), (int, float))]


def _require(metrics: dict, names: list[str]) -> None:
    if missing := _missing(metrics, names):
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise Skipped(f"metrics missing: {', '.join(missing[:3])}{more}")


def plot_seed_table(metrics: dict, path: Path, stamp: str) -> Path:
    """Seed 000's four rows: local vs MAGI milliseconds, and the speedup beside the seed's expectation."""
    _require(metrics, [f"seed.{row}.{m}" for row in SEED_ROWS for m in ("local_ms", "magi_ms", "speedup")])
    plt, fig, (times, speedups) = _figure(2)
    x = range(len(SEED_ROWS))
    local = [metrics[f"seed.{r}.local_ms"] for r in SEED_ROWS]
    magi = [metrics[f"seed.{r}.magi_ms"] for r in SEED_ROWS]
    times.bar([i - 0.2 for i in x], local, 0.4, label="local (one process, one call after another)", color="#9aa5b1")
    times.bar([i + 0.2 for i in x], magi, 0.4, label="MAGI (through the services)", color="#3b6ea5")
    times.set_xticks(list(x), SEED_ROWS)
    times.set_ylabel("ms per operation")
    times.set_title("Seed 000's table: wall time")
    times.legend(fontsize=8)
    measured = [metrics[f"seed.{r}.speedup"] for r in SEED_ROWS]
    expected = [metrics.get(f"seed.{r}.seed_speedup", SEED_SPEEDUP[r]) for r in SEED_ROWS]
    speedups.bar([i - 0.2 for i in x], measured, 0.4, label="measured", color="#3b6ea5")
    speedups.bar([i + 0.2 for i in x], expected, 0.4, label="seed 000 expects", color="none", edgecolor="#c0504d",
                 hatch="//")
    for i, (m, e) in enumerate(zip(measured, expected)):
        speedups.annotate(f"{m:.2f}x", (i - 0.2, m), ha="center", va="bottom", fontsize=8)
        speedups.annotate(f"{e:g}x", (i + 0.2, e), ha="center", va="bottom", fontsize=8, color="#c0504d")
    speedups.axhline(1.0, color="#555555", linewidth=0.8, linestyle="--")
    speedups.set_yscale("log")
    speedups.set_xticks(list(x), SEED_ROWS)
    speedups.set_ylabel("speedup, local / MAGI (log)")
    speedups.set_title("Speedup: measured vs the seed's expectation")
    speedups.legend(fontsize=8)
    return _save(plt, fig, path, stamp)


def plot_load_curves(metrics: dict, path: Path, stamp: str) -> Path:
    """Throughput and latency (p50, p99) against concurrency, for generate requests and for missions."""
    kinds = {"generate": "rps", "mission": "mps"}
    present = {k: [n for n in CONCURRENCY if not _missing(metrics, [f"load.{k}.c{n}.{unit}", f"load.{k}.c{n}.p50_ms",
                                                                       f"load.{k}.c{n}.p99_ms"])]
               for k, unit in kinds.items()}
    if not any(present.values()):
        raise Skipped("metrics missing: load.generate.c<N>.* and load.mission.c<N>.*")
    plt, fig, (rate, latency) = _figure(2)
    colours = {"generate": "#3b6ea5", "mission": "#c0504d"}
    for kind, levels in present.items():
        if not levels:
            continue
        unit = kinds[kind]
        rate.plot(levels, [metrics[f"load.{kind}.c{n}.{unit}"] for n in levels], marker="o", color=colours[kind],
                  label=f"{kind} ({'requests' if unit == 'rps' else 'missions'}/s)")
        for stat, style in (("p50", "-"), ("p99", "--")):
            latency.plot(levels, [metrics[f"load.{kind}.c{n}.{stat}_ms"] for n in levels], marker="o",
                         linestyle=style, color=colours[kind], label=f"{kind} {stat}")
    for ax, title, label in ((rate, "Throughput vs concurrency", "per second"),
                             (latency, "Latency vs concurrency", "ms (log)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(n) for n in CONCURRENCY])
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=8)
    latency.set_yscale("log")
    return _save(plt, fig, path, stamp)


BATCH_RATIOS = {  # metric: label of the bar
    "infer.batch10.tokens_per_s.ratio_vs_sequential": "10 clones, one KV buffer",
    "infer.batch10.split.tokens_per_s.ratio_vs_sequential": "10 clones, a buffer each",
    "infer.batch1.tokens_per_s.ratio_vs_plain": "1 request, one KV buffer",
    "infer.batch1.split.tokens_per_s.ratio_vs_plain": "1 request, a buffer each",
}


def plot_batch(metrics: dict, path: Path, stamp: str) -> Path:
    """Ten clones on one replica: aggregate tokens/s one after another vs batched, and the ratios."""
    needed = ["infer.batch10.tokens_per_s.sequential", "infer.batch10.tokens_per_s.batched"]
    _require(metrics, needed)
    plt, fig, (rates, ratios) = _figure(2)
    values = [metrics[n] for n in needed]
    bars = rates.bar(["one at a time", "batched (max_batch 10)"], values, color=["#9aa5b1", "#3b6ea5"])
    rates.bar_label(bars, [f"{v:.1f}" for v in values], fontsize=8)
    threads = metrics.get("infer.batch10.threads")
    rates.set_ylabel("tokens/s, all ten together")
    rates.set_title("10 generations on one replica" + (f", {threads:g} threads" if threads else ""))
    shown = {label: metrics[n] for n, label in BATCH_RATIOS.items() if not _missing(metrics, [n])}
    bars = ratios.barh(list(shown), list(shown.values()), color="#3b6ea5")
    ratios.bar_label(bars, [f"{v:.2f}x" for v in shown.values()], fontsize=8)
    ratios.axvline(1.0, color="#555555", linewidth=0.8, linestyle="--")
    ratios.axvline(2.0, color="#c0504d", linewidth=0.8, linestyle=":", label="goal for 10 clones (2x)")
    ratios.invert_yaxis()
    ratios.set_xlabel("tokens/s, batched engine / plain engine")
    ratios.set_title("Batched vs plain engine")
    ratios.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path, stamp)


PLOTS = (("seed_table.png", plot_seed_table), ("load_curves.png", plot_load_curves),
         ("batch_vs_sequential.png", plot_batch))


def stamp_for(entry: dict) -> str:
    return "MAGI benchmarks · " + describe(entry)


def write_plots(entry: dict, out_dir: Path = RESULTS, note=lambda _m: None) -> list[Path]:
    """Every plot the entry's metrics allow, into out_dir; each other one is skipped with a log line (and
    `note`, the bench's progress), never an exception."""
    written = []
    for name, plot in PLOTS:
        try:
            written.append(plot(entry["metrics"], out_dir / name, stamp_for(entry)))
        except Skipped as why:
            log.info("plot skipped", extra={"plot": name, "why": str(why)})
            note(f"plot {name} skipped ({why})")
    return written

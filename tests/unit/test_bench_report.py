"""What `just bench` keeps of a run (benchmarks/report.py, run.py): the history, --compare, --only, plots."""

import argparse
import asyncio
import datetime as dt
import json
import subprocess

import pytest

from benchmarks import report, run

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu": "Test CPU", "cores": 2, "ram_gb": 8.0, "arch": "x86_64", "os": "Linux", "python": "3.11.7",
           "llama_cpp_python": "0.3.36", "gpus": []}


def _entry(metrics: dict, commit: str = "a" * 40, day: int = 1, groups=("sched",)) -> dict:
    return report.history_entry(metrics, groups=list(groups), seconds=3.21,
                                now=dt.datetime(2026, 11, day, tzinfo=dt.timezone.utc),
                                git={"commit": commit, "dirty": False}, machine=MACHINE)


def seed_metrics() -> dict:
    out = {}
    for row, (local, magi) in zip(report.SEED_ROWS, [(500, 520), (5000, 2000), (1000, 800), (2000, 1500)]):
        out.update({f"seed.{row}.local_ms": local, f"seed.{row}.magi_ms": magi, f"seed.{row}.speedup": local / magi})
    return out


def load_metrics(kinds=("generate", "mission")) -> dict:
    out = {}
    for kind in kinds:
        unit = "rps" if kind == "generate" else "mps"
        for i, n in enumerate(report.CONCURRENCY):
            out.update({f"load.{kind}.c{n}.{unit}": 1.0 + i, f"load.{kind}.c{n}.p50_ms": 100.0 * 2**i,
                        f"load.{kind}.c{n}.p99_ms": 150.0 * 2**i})
    return out


BATCH = {"infer.batch10.threads": 2, "infer.batch10.tokens_per_s.sequential": 60.0,
         "infer.batch10.tokens_per_s.batched": 130.0, "infer.batch10.tokens_per_s.ratio_vs_sequential": 2.17,
         "infer.batch1.tokens_per_s.ratio_vs_plain": 0.99}


def test_history_appends_one_line_per_run_and_reads_back(tmp_path):
    path = tmp_path / "results" / "history.jsonl"
    first, second = _entry({"sched.placements_per_s": 100.0}), _entry({"sched.placements_per_s": 120.0}, day=2)
    report.append_history(first, path)
    report.append_history(second, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["metrics"] == {"sched.placements_per_s": 120.0}
    assert report.read_history(path) == [first, second]
    assert second["date"] == "2026-11-02T00:00:00+00:00" and second["commit"] == "a" * 40
    assert second["machine"]["cpu"] == "Test CPU" and second["groups"] == ["sched"] and second["seconds"] == 3.2


def test_a_damaged_history_line_is_skipped(tmp_path):
    path = tmp_path / "history.jsonl"
    report.append_history(_entry({"x": 1.0}), path)
    with path.open("a") as out:
        out.write('{"date": "2026-11-02", "metr\n\n')  # a run killed while writing
    report.append_history(_entry({"x": 2.0}, day=3), path)
    assert [e["metrics"]["x"] for e in report.read_history(path)] == [1.0, 2.0]
    assert report.read_history(tmp_path / "absent.jsonl") == []


def test_compare_takes_each_metric_from_the_last_run_that_measured_it():
    history = [_entry({"a": 10.0, "b": 4.0}, day=1), _entry({"a": 8.0}, day=2, groups=["sched"]),
               _entry({"a": 10.0, "b": 5.0, "c": 1.0, "d": 0.0}, day=3)]
    history[0]["metrics"]["d"] = 0.0
    rows = {r[0]: r[1:] for r in report.compare_rows(history)}
    assert rows["a"] == [8.0, 10.0, "+25.0%"]
    assert rows["b"] == [4.0, 5.0, "+25.0%"]  # run 2 (--only) lacked it: run 1's value
    assert rows["c"] == ["-", 1.0, ""]  # new in this run
    assert rows["d"] == [0.0, 0.0, ""]
    assert report.compare_rows([]) == []


def test_bench_compare_prints_the_table_without_running_anything(tmp_path, capsys):
    path = tmp_path / "history.jsonl"
    assert run.main(["--compare", "--history", str(path)]) == 1
    report.append_history(_entry({"bus.rtt_ms.p50": 0.5}, commit="1" * 40, day=1), path)
    report.append_history(_entry({"bus.rtt_ms.p50": 0.4}, commit="2" * 40, day=2), path)
    capsys.readouterr()
    assert run.main(["--compare", "--history", str(path)]) == 0
    out = capsys.readouterr().out
    assert "new: 2026-11-02T00:00:00+00:00 commit 2222222222" in out and "old: 2026-11-01" in out
    line = next(x for x in out.splitlines() if x.startswith("bus.rtt_ms.p50"))
    assert line.split() == ["bus.rtt_ms.p50", "0.5", "0.4", "-20.0%"]


def test_only_picks_groups_in_their_order_and_refuses_unknown_ones():
    assert [g.name for g in run.chosen("batch, sched")] == ["sched", "batch"]
    assert [g.name for g in run.chosen("")] == [g.name for g in run.GROUPS]
    assert len({g.name for g in run.GROUPS}) == len(run.GROUPS)
    with pytest.raises(SystemExit) as info:
        run.chosen("sched,warp")
    assert "warp" in str(info.value) and "sched" in str(info.value)


def test_groups_run_in_turn_sync_or_async_and_a_failure_costs_only_its_own():
    async def later(_run):
        await asyncio.sleep(0)
        return {"b": 2.0}

    def broken(_run):
        raise RuntimeError("no model")

    groups = [run.Group("one", "first", lambda _r: {"a": 1.0}), run.Group("bad", "fails", broken),
              run.Group("two", "second", later)]
    results = run.measure(groups, argparse.Namespace())
    assert results.metrics == {"a": 1.0, "b": 2.0}  # the groups after a failed one still ran
    assert results.failed == {"bad": "RuntimeError: no model"} and results.done == {"one", "two"}


def test_a_stack_that_does_not_start_fails_its_groups_only(monkeypatch):
    async def no_stack(groups, args, results):
        raise OSError("port taken")

    monkeypatch.setattr(run, "_on_stack", no_stack)
    groups = [run.Group("s1", "on the stack", lambda _r: {"x": 1.0}, on_stack=True),
              run.Group("plain", "alone", lambda _r: {"y": 2.0}),
              run.Group("s2", "on the stack too", lambda _r: {"z": 3.0}, on_stack=True)]
    results = run.measure(groups, argparse.Namespace())
    assert results.metrics == {"y": 2.0} and results.failed == {"s1": "OSError: port taken", "s2": "OSError: port taken"}


def test_plots_are_drawn_from_the_metrics(tmp_path):
    entry = _entry({**seed_metrics(), **load_metrics(), **BATCH})
    written = report.write_plots(entry, tmp_path)
    assert sorted(p.name for p in written) == ["batch_vs_sequential.png", "load_curves.png", "seed_table.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


def test_plots_without_their_metrics_are_skipped(tmp_path):
    notes = []
    assert report.write_plots(_entry({"sched.placements_per_s": 1.0}), tmp_path, notes.append) == []
    assert list(tmp_path.iterdir()) == [] and len(notes) == 3
    assert any("seed.single.local_ms" in n for n in notes)
    partial = {**seed_metrics(), **load_metrics(kinds=("generate",))}
    del partial["seed.full_op.magi_ms"]
    written = report.write_plots(_entry(partial), tmp_path, notes.append)
    assert [p.name for p in written] == ["load_curves.png"]  # generate alone is enough for the load curves


def test_the_stamp_names_the_commit():
    entry = _entry({}, commit="0123456789abcdef" + "0" * 24)
    entry["dirty"] = True
    assert "commit 0123456789 (dirty)" in report.stamp_for(entry) and "Test CPU, 2 cores" in report.stamp_for(entry)


def test_git_facts_tolerate_no_git_and_see_a_dirty_tree(tmp_path):
    assert report.git_facts(tmp_path) == {"commit": "", "dirty": False}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "-C", str(tmp_path), "add", "f"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "c"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert report.git_facts(tmp_path) == {"commit": head.strip(), "dirty": False}
    (tmp_path / "f").write_text("2")
    assert report.git_facts(tmp_path)["dirty"] is True


def test_machine_facts_describe_this_machine():
    facts = report.machine_facts()
    assert facts["cores"] >= 1 and facts["ram_gb"] > 0 and facts["python"].count(".") == 2
    assert facts["cpu"] and isinstance(facts["gpus"], list) and facts["llama_cpp_python"]

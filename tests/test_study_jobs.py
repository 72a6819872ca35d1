"""`--jobs N`: the study's units as N processes side by side on one machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluation.study.jobs import laid_out, run_jobs, runnable, threads_per_job
from evaluation.study.run import main as study_main
from evaluation.study.units import PlannedUnit

from test_study import study_values


def unit(name: str, *needs: str) -> PlannedUnit:
    return PlannedUnit("segmenter", (1.0, name, 0), (), tuple((n, f"segmenter/r100/{n}/0") for n in needs))


class FakeProcess:
    """A unit's process that ends on its `lifetime`-th poll with `status`, adding its id to `ledger` on 0."""

    def __init__(self, unit_id: str, ledger: set[str], status: int = 0, lifetime: int = 2, writes: bool = True):
        self.unit_id, self.ledger, self.status, self.left, self.writes = unit_id, ledger, status, lifetime, writes
        self.signals: list[int] = []

    def poll(self) -> int | None:
        self.left -= 1
        if self.left > 0:
            return None
        if self.status == 0 and self.writes:
            self.ledger.add(self.unit_id)
        return self.status

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def wait(self) -> int:
        return self.status


def test_a_unit_is_runnable_once_every_unit_it_needs_is_done():
    units = [unit("a"), unit("b", "a"), unit("c")]
    assert [u.id for u in runnable(units, set(), set())] == ["segmenter/r100/a/0", "segmenter/r100/c/0"]
    assert [u.id for u in runnable(units, {"segmenter/r100/a/0"}, {"segmenter/r100/c/0"})] == ["segmenter/r100/b/0"]


def test_the_estimate_lays_units_out_as_the_jobs_start_them():
    """In plan order, each once its needs are done: b waits for a while c runs beside a; a need outside the
    units (in a resumed study's ledger) counts as done."""
    units = [unit("a"), unit("b", "a"), unit("c")]
    seconds = {"segmenter/r100/a/0": 10.0, "segmenter/r100/b/0": 10.0, "segmenter/r100/c/0": 20.0}
    assert laid_out(units, seconds, 1) == 40.0
    assert laid_out(units, seconds, 2) == 20.0  # a and c at 0, b at 10
    assert laid_out(units, seconds, 3) == 20.0
    # c and a at 0, b at 10 (to 20); d needs c, so it starts at 20 and ends at 25
    units = [unit("c"), unit("d", "c"), unit("a"), unit("b", "a")]
    assert laid_out(units, {**seconds, "segmenter/r100/d/0": 5.0}, 2) == 25.0
    assert laid_out([unit("b", "x")], {"segmenter/r100/b/0": 3.0}, 2) == 3.0
    assert laid_out([], {}, 2) == 0.0


def test_units_run_side_by_side_up_to_the_number_of_jobs_and_each_after_its_needs():
    ledger: set[str] = set()
    started: list[tuple[str, int]] = []
    running: dict[str, FakeProcess] = {}

    def launch(planned: PlannedUnit) -> FakeProcess:
        running[planned.id] = FakeProcess(planned.id, ledger)
        started.append((planned.id, sum(p.left > 0 for p in running.values())))
        return running[planned.id]

    units = [unit("a"), unit("b", "a"), unit("c"), unit("d")]
    lines: list[str] = []
    failed = run_jobs(units, 2, lambda: set(ledger), launch, lines.append, lambda u: Path("x.log"), poll_seconds=0)
    assert failed == []
    assert ledger == {u.id for u in units}
    assert [name for name, _ in started] == ["segmenter/r100/a/0", "segmenter/r100/c/0", "segmenter/r100/b/0",
                                             "segmenter/r100/d/0"]
    assert max(count for _, count in started) == 2
    assert sum(line.startswith("[done]") for line in lines) == 4


def test_a_failed_unit_stops_new_launches_and_is_named_with_its_log():
    ledger: set[str] = set()
    launched: list[str] = []

    def launch(planned: PlannedUnit) -> FakeProcess:
        launched.append(planned.id)
        return FakeProcess(planned.id, ledger, status=2 if planned.id.endswith("/a/0") else 0,
                           lifetime=1 if planned.id.endswith("/a/0") else 3)

    lines: list[str] = []
    units = [unit("a"), unit("b"), unit("c")]
    failed = run_jobs(units, 2, lambda: set(ledger), launch, lines.append, lambda unit_id: Path(f"logs/{unit_id}.log"),
                      poll_seconds=0)
    assert failed == ["segmenter/r100/a/0"]
    assert launched == ["segmenter/r100/a/0", "segmenter/r100/b/0"]  # c was not started after a failed
    assert ledger == {"segmenter/r100/b/0"}  # the unit running beside it finished
    assert "[failed] segmenter/r100/a/0 after 0 s (exit status 2); its log: logs/segmenter/r100/a/0.log" in lines


def test_the_study_ends_with_one_line_naming_the_failed_unit_its_error_and_its_log(tmp_path):
    from evaluation.study.jobs import failure_line

    log = tmp_path / "segmenter-r100-real-0.log"
    log.write_text("=== 2026-12-07 segmenter/r100/real/0 (1 CPU thread)\nerror: key 'x' is wrong\n")
    assert failure_line("segmenter/r100/real/0", log) == \
        f"error: unit segmenter/r100/real/0 failed: key 'x' is wrong (its log: {log})"
    assert failure_line("a", tmp_path / "none.log") == f"error: unit a failed (its log: {tmp_path / 'none.log'})"


def test_a_unit_that_ends_without_its_ledger_line_counts_as_failed():
    ledger: set[str] = set()
    lines: list[str] = []
    failed = run_jobs([unit("a")], 2, lambda: set(ledger),
                      lambda planned: FakeProcess(planned.id, ledger, writes=False), lines.append,
                      lambda u: Path("a.log"), poll_seconds=0)
    assert failed == ["segmenter/r100/a/0"]
    assert "it ended without its ledger line" in lines[-1]


def test_a_stop_of_the_study_stops_every_running_unit():
    processes: list[FakeProcess] = []

    def launch(planned: PlannedUnit) -> FakeProcess:
        processes.append(FakeProcess(planned.id, set(), lifetime=10 ** 6))
        return processes[-1]

    polls = iter(range(3))

    def read_done() -> set[str]:
        if next(polls, None) is None:
            raise KeyboardInterrupt  # SIGTERM or Ctrl-C while the units run
        return set()

    with pytest.raises(KeyboardInterrupt):
        run_jobs([unit("a"), unit("b")], 2, read_done, launch, lambda _: None, lambda u: Path("x"), poll_seconds=0)
    assert [p.signals for p in processes] == [[15], [15]]


def test_each_job_gets_its_share_of_the_threads_and_at_least_one():
    assert threads_per_job(2, 2) == 1
    assert threads_per_job(4, 16) == 4
    assert threads_per_job(3, 2) == 1


@pytest.mark.parametrize("extra, message", [
    (["--jobs", "0"], "error: --jobs must be 1 or more (units run side by side on this machine), got 0"),
    (["--jobs", "2", "--unit", "segmenter/r100/real/0"],
     "error: --jobs runs the whole study here; it does not go with --unit"),
    (["--jobs", "2", "--report-only"], "error: --jobs runs the whole study here; it does not go with --report-only"),
])
def test_a_jobs_option_the_study_cannot_use_is_one_line(extra, message, tmp_path, capsys):
    config = tmp_path / "study.json"
    config.write_text(json.dumps({"data_dir": "x", "output_dir": str(tmp_path / "out")}))
    assert study_main(["-c", str(config), *extra]) == 2
    assert capsys.readouterr().err.strip() == message


def test_a_study_run_as_two_jobs_runs_every_unit_once_records_its_threads_and_writes_the_report(
        demo_dir, tmp_path, capsys):
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    config = tmp_path / "study.json"
    config.write_text(json.dumps(values))
    assert study_main(["-c", str(config), "--jobs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    entries = [json.loads(line) for line in (tmp_path / "study" / "ledger.jsonl").read_text().splitlines()]
    units = [entry["unit"] for entry in entries]
    assert sorted(units) == sorted(["sample/r100/paste", "segmenter/r100/real/0", "segmenter/r100/real/1",
                                    "segmenter/r100/paste/0", "segmenter/r100/paste/1", "alignment/r100/paste/0",
                                    "alignment/r100/paste/1"])
    assert {entry["threads"] for entry in entries} == {threads_per_job(2, torch.get_num_threads())}
    assert out.count("[start] ") == out.count("[done] ") == 7
    assert (tmp_path / "study" / "report.md").is_file()
    assert len(list((tmp_path / "study" / "logs").glob("*.log"))) == 7
    # a rerun finds everything done and only writes the report
    assert study_main(["-c", str(config), "--jobs", "2", "--no-progress"]) == 0
    assert "[start]" not in capsys.readouterr().out


def test_the_estimate_with_jobs_times_the_models_at_a_jobs_threads_and_lays_the_units_out(demo_dir, tmp_path,
                                                                                           capsys):
    """`--estimate --jobs 3` on 2 threads: each job gets 1 thread, as `--jobs` gives them, and 3 jobs share 2
    cores, so the layout counts 2 at a time; the threads are as they were after."""
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    config = tmp_path / "study.json"
    config.write_text(json.dumps(values))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert study_main(["-c", str(config), "--estimate", "--jobs", "3"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "estimated wall time on this machine (cpu, 1 thread, " in out
    assert "**with --jobs 3: about " in out and "laid out 2 at a time" in out
    assert "--jobs 3 is more jobs than the 2 threads here" in out
    assert not (tmp_path / "study").exists()


def test_a_units_process_imports_the_segmenter_libraries_only_when_it_builds_a_segmenter():
    """Each unit of --jobs and --slurm is a process of its own: smp, timm, torchvision and torchmetrics (4-6 s of
    imports) are loaded by the segmenter units that use them, not by every sample or SDM unit."""
    import subprocess
    import sys

    probe = ("import sys, evaluation.study.run\n"
             "print(sorted(m for m in ('segmentation_models_pytorch', 'timm', 'torchvision', 'torchmetrics') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

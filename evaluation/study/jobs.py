"""`--jobs N`: the study's units as N processes side by side on this machine.

Each unit runs as its own `--unit` process of the same command (what a Slurm job runs), started once every unit
it needs is in the ledger, in plan order, with 1/N of the CPU threads one study would use (OMP_NUM_THREADS). On
a small CPU one training does not use its cores fully: on a 2-core AMD EPYC (2026-12-07), two segmenter trainings
of one thread each did 2.5 steps/s together, one of two threads 1.8. The thread count changes the rounding of
sums, not a seed's initial weights or batch order; each unit records it (`threads`).

A unit's output goes to `<output_dir>/logs/<unit id, / as ->.log`; this process prints one line when a unit
starts and one when it ends. A unit that fails stops the launching of new ones: the running ones finish (their
work is kept), then the study ends with one line naming the unit and its log. Ctrl-C or SIGTERM stops every
unit as a stop of the study would (a training saves latest.pt, a sample keeps its finished images)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from guided_diffusion.errors import ConfigError

from .progress import clock as progress_clock, format_duration
from .slurm import REPO, log_name, unit_python
from .units import PlannedUnit


class Process(Protocol):
    def poll(self) -> int | None: ...

    def send_signal(self, signum: int) -> None: ...

    def wait(self) -> int: ...


@dataclass
class Running:
    process: Process
    started: float


def runnable(units: Sequence[PlannedUnit], done: set[str], busy: set[str]) -> list[PlannedUnit]:
    """The units, in plan order, that are neither done nor `busy` (running) and whose needs are all done."""
    return [unit for unit in units if unit.id not in done and unit.id not in busy
            and all(needed in done for _, needed in unit.needs)]


def run_jobs(units: Sequence[PlannedUnit], jobs: int, read_done: Callable[[], set[str]],
             launch: Callable[[PlannedUnit], Process], log: Callable[[str], None],
             log_path: Callable[[str], Path], poll_seconds: float = 5.0,
             clock: Callable[[], float] = time.perf_counter) -> list[str]:
    """Run the units not done, `jobs` at a time, each once its needs are done (`read_done`: the ids in the
    ledger now); returns the ids of the units that failed (empty when every unit ran). A unit failed when its
    process ended with a status other than 0, or with 0 but without its ledger line."""
    started = clock()
    running: dict[str, Running] = {}
    failed: list[str] = []
    planned = {unit.id for unit in units}

    def elapsed() -> str:
        return progress_clock(clock() - started)

    try:
        while True:
            ended = {unit_id: status for unit_id, job in running.items()
                     if (status := job.process.poll()) is not None}
            done = read_done()  # after the polls: a unit writes its ledger line before its process ends
            for unit_id, status in ended.items():
                job = running.pop(unit_id)
                took = format_duration(clock() - job.started)
                if status == 0 and unit_id in done:
                    log(f"[done] {unit_id} in {took} | {len(done & planned)} of {len(planned)} units done "
                        f"| elapsed {elapsed()}")
                else:
                    failed.append(unit_id)
                    why = f"exit status {status}" if status != 0 else "it ended without its ledger line"
                    log(f"[failed] {unit_id} after {took} ({why}); its log: {log_path(unit_id)}")
            if not failed:
                for unit in runnable(units, done, set(running)):
                    if len(running) >= jobs:
                        break
                    running[unit.id] = Running(launch(unit), clock())
                    log(f"[start] {unit.id} | {len(running)} of {jobs} jobs running | elapsed {elapsed()}")
            if not running:
                return failed
            time.sleep(poll_seconds)
    except BaseException:  # Ctrl-C, SIGTERM (raised as KeyboardInterrupt below), or a bug: stop every unit
        for job in running.values():
            if job.process.poll() is None:
                job.process.send_signal(signal.SIGTERM)
        for job in running.values():
            job.process.wait()
        raise


def laid_out(units: Sequence[PlannedUnit], seconds: dict[str, float], jobs: int) -> float:
    """The wall time of `units` run `jobs` at a time as run_jobs starts them (in plan order, each once its needs
    are done), each taking its `seconds`. A need outside `units` counts as done (a resumed study's ledger)."""
    planned = {unit.id for unit in units}
    done = {needed for unit in units for _, needed in unit.needs if needed not in planned}
    ends: dict[str, float] = {}  # the running units' end times
    now = 0.0
    while True:
        for unit in runnable(units, done, set(ends))[:jobs - len(ends)]:
            ends[unit.id] = now + seconds[unit.id]
        if not ends:
            left = planned - done
            if left:
                raise ValueError(f"units whose needs never end: {', '.join(sorted(left)[:3])}")
            return now
        now = min(ends.values())
        for unit_id in [unit_id for unit_id, end in ends.items() if end <= now]:
            done.add(unit_id)
            del ends[unit_id]


def threads_per_job(jobs: int, threads: int) -> int:
    """The CPU threads each of `jobs` processes gets out of the `threads` one study process would use."""
    return max(1, threads // jobs)


def launcher(study_argv: Sequence[str], logs: Path, threads: int) -> Callable[[PlannedUnit], subprocess.Popen]:
    """Start a unit as `python -m evaluation.study <the study's arguments> --unit <id> --no-progress`, with
    `threads` CPU threads, its output appended to its log under `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    env = job_env(threads)

    def launch(unit: PlannedUnit) -> subprocess.Popen:
        with open(unit_log(logs, unit.id), "a", encoding="utf-8") as handle:
            handle.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {unit.id} ({threads} CPU thread"
                         f"{'s' if threads > 1 else ''})\n")
            handle.flush()
            return subprocess.Popen(unit_python(study_argv, ["--unit", unit.id]), stdout=handle,
                                    stderr=subprocess.STDOUT, env=env)
    return launch


def job_env(threads: int) -> dict[str, str]:
    """The environment of a unit's process: `threads` CPU threads, no progress bars, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
            "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}


def start_seconds(threads: int) -> float:
    """Seconds a unit's process spends before its work: Python importing the study (torch) and the segmenter's
    libraries (smp, timm, torchvision, torchmetrics: loaded by the segmenter and alignment units, most of a study,
    not by the others), timed once in a process started as `--jobs` starts one (it also reads the dataset and
    opens the study, not timed)."""
    started = time.perf_counter()
    imports = "import evaluation.study.run, segmentation_models_pytorch, torchmetrics"
    subprocess.run([sys.executable, "-c", imports], env=job_env(threads), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def unit_log(logs: Path, unit_id: str) -> Path:
    """A `--jobs` unit's log: named as its Slurm job's is, without the job id."""
    return logs / f"{log_name(unit_id)}.log"


def failure_line(unit_id: str, log: Path) -> str:
    """The study's last line for a unit that failed: its id, the last error line of its log, and the log."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return f"error: unit {unit_id} failed" + (f": {errors[-1]}" if errors else "") + f" (its log: {log})"


def check_jobs(jobs: int | None, other_modes: Sequence[str]) -> None:
    """One line for a `--jobs` the study cannot use."""
    if jobs is None:
        return
    if jobs < 1:
        raise ConfigError(f"--jobs must be 1 or more (units run side by side on this machine), got {jobs}")
    if other_modes:
        raise ConfigError(f"--jobs runs the whole study here; it does not go with {' or '.join(other_modes)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM to a `--jobs` study: stop its units as Ctrl-C would."""


def raise_on_sigterm(signum, frame) -> None:
    raise Terminated(f"signal {signum}")

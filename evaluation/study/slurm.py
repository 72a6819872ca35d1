"""The study as Slurm jobs: `evaluation/experiment.sh -c <config> --slurm [--sbatch-args "..."]`.

Each unit of the plan (plan.py) that the ledger does not hold yet is one `sbatch` job running the study for that
unit alone (`--unit <id>`), with `--dependency=afterok` on the jobs of the units it needs, so that units that do
not need each other run at the same time; a last job writes the report (`--report-only`) once every other job
has ended, however it ended. Slurm does the scheduling; the ledger stays the record of what is done (each job
appends its line under a lock).

Rerunning the same command after a failed or cancelled job submits only what is unfinished: units the ledger holds
are skipped, and units whose job from an earlier submission is still pending or running are not submitted twice
(their job ids are kept in `<output_dir>/slurm/jobs.json`, with the last report job's under "report"; the new
jobs wait on them). `--report-only` works at any
time. Each job's log is `<output_dir>/slurm/<unit id, / as ->-<job id>.log`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guided_diffusion.errors import ConfigError
from guided_diffusion.run_folder import write_json

from .units import UNIT_KINDS, PlannedUnit

REPO = Path(__file__).resolve().parents[2]
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")
"""Job states in which a job of an earlier submission will still run its unit."""


def job_name(unit_id: str) -> str:
    return f"study:{unit_id}"


def log_name(unit_id: str) -> str:
    return unit_id.replace("/", "-")


def unit_python(study_argv: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The study's own command line with `extra` (`--unit <id>` or `--report-only`), in this Python: what a Slurm
    job and a `--jobs` process run."""
    return [sys.executable, "-m", "evaluation.study", *study_argv, *extra, "--no-progress"]


def unit_command(study_argv: Sequence[str], extra: Sequence[str]) -> str:
    """The shell line a job runs: this Python, the study's own command line with `extra` (`--unit <id>` or
    `--report-only`), from the folder the study was submitted from, with the repository on PYTHONPATH."""
    python = unit_python(study_argv, extra)
    return (f"cd {shlex.quote(os.getcwd())} && export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"
            f" TQDM_DISABLE=1 && exec {shlex.join(python)}")


def parse_kind_args(values: Sequence[str]) -> dict[str, list[str]]:
    """`--sbatch-kind sdm-train="--gres=gpu:1 --time=2:00:00"` options as {unit kind: sbatch arguments}."""
    kinds: dict[str, list[str]] = {}
    for value in values:
        kind, sep, args = value.partition("=")
        if not sep or kind not in UNIT_KINDS:
            raise ConfigError(f"--sbatch-kind {value!r}: must be KIND=\"sbatch arguments\" with KIND one of "
                              f"{', '.join(UNIT_KINDS)}")
        kinds[kind] = shlex.split(args)
    return kinds


class Sbatch:
    """The cluster's `sbatch` and `squeue` (a stand-in can replace them in tests)."""

    def submit(self, args: list[str]) -> int:
        result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise ConfigError(f"sbatch refused a job ({shlex.join(args[:6])} ...): "
                              f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        return int(result.stdout.strip().split(";")[0])

    def states(self, job_ids: Sequence[int]) -> dict[int, str]:
        """The state of each job Slurm still knows; jobs it has forgotten are left out."""
        if not job_ids:
            return {}
        result = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(map(str, job_ids))],
                                capture_output=True, text=True)
        states = {}
        for line in result.stdout.splitlines():
            job, _, state = line.partition(" ")
            if job.isdigit():
                states[int(job)] = state.strip()
        return states


def submit_study(root: Path, units: list[PlannedUnit], done: dict[str, Any], study_argv: Sequence[str],
                 sbatch_args: Sequence[str], kind_args: dict[str, list[str]], log: Callable[[str], None],
                 sbatch: Sbatch | None = None) -> dict[str, int]:
    """Submit every unit not `done` (unit id -> its ledger entry, None when not done) as a job, after the jobs of
    the units it needs, then the report job; returns unit id -> job id of the units now queued, and "report"."""
    if sbatch is None:
        if shutil.which("sbatch") is None:
            raise ConfigError("--slurm: there is no sbatch command here; submit from a Slurm login node, or run the "
                              "study on this machine without --slurm")
        sbatch = Sbatch()
    folder = root / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "jobs.json"
    earlier: dict[str, int] = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    states = sbatch.states(sorted(set(earlier.values())))
    queued = {unit: job for unit, job in earlier.items() if states.get(job) in ACTIVE_STATES}
    jobs: dict[str, int] = {}
    submitted = kept = 0
    for unit in units:
        if done.get(unit.id) is not None:
            continue
        if unit.id in queued:
            jobs[unit.id] = queued[unit.id]
            kept += 1
            continue
        after = sorted({jobs[needed] for _, needed in unit.needs if needed in jobs})
        args = [f"--job-name={job_name(unit.id)}", f"--output={folder / log_name(unit.id)}-%j.log",
                *(["--dependency=afterok:" + ":".join(map(str, after)), "--kill-on-invalid-dep=yes"] if after else []),
                *sbatch_args, *kind_args.get(unit.kind, []),
                "--wrap", unit_command(study_argv, ["--unit", unit.id])]
        jobs[unit.id] = sbatch.submit(args)
        submitted += 1
        write_json(record, {**earlier, **jobs})  # a failure midway leaves the jobs already queued on record
    report_after = sorted(set(jobs.values()))
    report = sbatch.submit([f"--job-name={job_name('report')}", f"--output={folder / 'report'}-%j.log",
                            *(["--dependency=afterany:" + ":".join(map(str, report_after))] if report_after else []),
                            *sbatch_args, "--wrap", unit_command(study_argv, ["--report-only"])])
    jobs["report"] = report
    write_json(record, {**earlier, **jobs})
    log(f"slurm: {submitted} units submitted, {kept} still queued from before, "
        f"{sum(entry is not None for entry in done.values())} done in the ledger; the report job {report} runs "
        f"when they end ({folder}/report-{report}.log). Rerun this command after a failure: it submits only "
        f"what is unfinished.")
    return jobs


def wait_for(job_ids: Sequence[int], sbatch: Sbatch | None = None, poll: float = 2.0) -> None:
    """Block until Slurm lists none of `job_ids` as active (for `--slurm --wait`; a study of hours waits hours)."""
    sbatch = sbatch or Sbatch()
    while any(state in ACTIVE_STATES for state in sbatch.states(job_ids).values()):
        time.sleep(poll)

"""The study as Slurm jobs (`evaluation/experiment.sh --slurm`) on a real single-node Slurm (the cluster of
test_slurm.py): a unit a job, after the jobs of the units it needs, gives the same summary.json as the study run
here in one process; a job cancelled midway leaves the study to a rerun of the same command, which submits only
what is unfinished and ends with the same summary.

Without the Slurm binaries, or when not root, the tests are skipped with the reason (test_slurm.py's marks)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from test_slurm import cluster, pytestmark  # noqa: F401 - the fixture and the skip marks
from test_study import study_values

REPO = Path(__file__).resolve().parents[1]
UNITS = 8  # of the study below
TIMINGS = ("seconds", "seconds_this_invocation", "stage_seconds", "command")


def experiment(cluster, *args: str, timeout: float = 900) -> str:
    """evaluation/experiment.sh with `args`, from the stand-in repository, as a user on the login node would."""
    result = subprocess.run([str(REPO / "evaluation" / "experiment.sh"), *args, "--no-progress"],
                            cwd=cluster.submit_dir, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + cluster.daemon_logs()
    return result.stdout


def numbers(folder: Path) -> dict:
    """summary.json without what may differ between two runs of the same study: times and the command line."""
    summary = json.loads((folder / "summary.json").read_text())
    return {key: value for key, value in summary.items() if key not in TIMINGS}


def job_logs(folder: Path) -> str:
    return "".join(f"\n--- {log.name} ---\n" + log.read_text(errors="replace")[-1500:]
                   for log in sorted((folder / "slurm").glob("*.log")))


@pytest.fixture(scope="module")
def study(cluster, demo_dir):
    """A quick study of SDM inpainting at 100 % (2 seeds; the SDM trained, not finetuned), and its summary run here
    in one process."""
    values = study_values(demo_dir, "Results/study_local", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "sdm_inpaint", "synthetic": ["sdm_inpaint"]}])
    values["generators"] = {"sdm_inpaint": values["generators"]["sdm_inpaint"]}
    values["generators"]["sdm_inpaint"]["sample"]["s"] = 1.0  # unguided: the SDM needs no null-label finetuning
    values["sdm"]["finetune"] = None
    values["segmenter"]["steps"] = 24  # enough for scores above 0, so that equal summaries say something
    config = cluster.submit_dir / "study.json"
    config.write_text(json.dumps(values))
    experiment(cluster, "-c", str(config))
    return config, numbers(cluster.submit_dir / "Results" / "study_local")


def test_the_study_as_slurm_jobs_gives_the_summary_of_the_study_run_here(cluster, study):
    config, local = study
    out = experiment(cluster, "-c", str(config), "--output-dir", "Results/study_slurm", "--slurm",
                     "--sbatch-args", "--cpus-per-task=1", "--wait")
    folder = cluster.submit_dir / "Results" / "study_slurm"
    # the SDM's training, inpainting, 2 variants x 2 seeds, 2 alignments
    assert f"slurm: {UNITS} units submitted, 0 still queued from before, 0 done in the ledger" in out
    assert numbers(folder) == local, job_logs(folder)


def test_a_cancelled_job_is_submitted_again_by_the_same_command_with_only_what_is_unfinished(cluster, study):
    config, local = study
    folder = cluster.submit_dir / "Results" / "study_cancelled"
    submit = ["-c", str(config), "--output-dir", "Results/study_cancelled", "--slurm", "--sbatch-args",
              "--cpus-per-task=1"]
    experiment(cluster, *submit)
    jobs = json.loads((folder / "slurm" / "jobs.json").read_text())
    training = jobs["sdm-train/r100/sdm_inpaint"]
    deadline = time.monotonic() + 240
    while cluster.job(training)["JobState"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    cluster.command("scancel", str(training))  # midway: the SDM's training and every unit after it never run
    report = jobs["report"]
    cluster.wait(report)  # the report job runs after every job has ended, however it ended
    ledger = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]
    assert "sdm-train" not in {entry["kind"] for entry in ledger}
    assert cluster.job(jobs["sample/r100/sdm_inpaint"])["JobState"] == "CANCELLED"
    summary = json.loads((folder / "summary.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["real"]  # what was done, reported
    out = experiment(cluster, *submit, "--wait")
    done = len(ledger)
    assert f"slurm: {UNITS - done} units submitted, 0 still queued from before, {done} done in the ledger" in out
    assert numbers(folder) == local, job_logs(folder)
    assert os.path.getsize(folder / "ledger.jsonl") > 0

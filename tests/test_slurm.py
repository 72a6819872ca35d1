"""The sbatch templates in slurm/ on a real single-node Slurm: train (stopped mid-run by the time-limit signal and
by a requeue, it resumes from its checkpoint) and sample with `srun` over 2 tasks, finetune and evaluate.

The fixture starts munged, slurmctld and slurmd (Debian's packages; .ci/run installs them) on this machine with a
generated slurm.conf for `localhost` (2 CPUs, partition `gpu` with two stand-in GPU devices, so the templates'
SITE lines work as written) and stops them afterwards. Everything lives in a temporary folder: its own munge key
and socket, state, spool, logs and ports. Jobs run from a stand-in repository (links to main.py, the package,
slurm/ and evaluation/, plus a Results/ folder) so that their logs land in a temporary Results/.
Without the binaries, or when not root (slurmd must start jobs), the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.config import config_from_dict
from guided_diffusion.sampling.sample import run_sampling
from test_distributed import (PROCESSES, REPO, STEPS, assert_losses_like_one_process,  # noqa: F401
                              assert_same_samples, assert_weights_like_one_process, clean_environment,
                              folder_digest, one_thread, read_csv_column, reference, sampling_values, show_in_ci_log,
                              silent, training_values, write_json_file)

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
JOB_TIMEOUT = 240
ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED")  # the job states after which nothing more runs


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name, path=SEARCH_PATH) is None]


pytestmark = [
    pytest.mark.skipif(bool(missing_binaries()),
                       reason=f"Slurm/munge binaries missing ({', '.join(missing_binaries())}); install slurmctld "
                              "slurmd slurm-client munge (.ci/run does)"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="a local Slurm test cluster needs root (slurmd starts the jobs)"),
]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def slurm_conf(folder: Path, ports: list[int]) -> str:
    """One node, `localhost`, 2 CPUs and 2 stand-in GPUs; no accounting, no cgroups; requeued jobs may start
    again after 6 s (cred_expire + 1) and the scheduler looks every second."""
    return "\n".join([
        "ClusterName=sdmtest", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={folder}/munge.socket,cred_expire=5",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none", "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
        "KillWait=30", "MinJobAge=3600", "GresTypes=gpu",
        "NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:2 State=UNKNOWN",
        "PartitionName=gpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""])


def stand_in_gpus(folder: Path) -> list[Path]:
    """Two character devices for gres.conf (a copy of /dev/null's numbers; plain files where mknod is refused:
    slurmd then logs an error but still counts them)."""
    devices = [folder / f"gpu{i}" for i in range(2)]
    for device in devices:
        try:
            os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError:
            device.touch()
    return devices


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]
    submit_dir: Path

    def command(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {result.stdout}{result.stderr}{self.daemon_logs()}")
        return result.stdout

    def daemon_logs(self) -> str:
        return "".join(f"\n--- {name} (end) ---\n" + (self.folder / name).read_text(errors="replace")[-2000:]
                       for name in ("slurmctld.log", "slurmd.log") if (self.folder / name).exists())

    def sbatch(self, template: str, *args: str, options: tuple[str, ...] = ()) -> int:
        """Submit slurm/<template>.sbatch from the stand-in repository; the job id. The SITE lines stay as
        written except for --cpus-per-task (this node has 2 CPUs)."""
        output = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", *options, f"slurm/{template}.sbatch",
                                 *args], cwd=self.submit_dir, env=self.env, capture_output=True, text=True, timeout=60)
        assert output.returncode == 0, output.stderr + self.daemon_logs()
        return int(output.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        line = self.command("scontrol", "show", "job", "-o", str(job_id))
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def wait(self, job_id: int, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in ENDED_STATES:
                return job
            time.sleep(0.5)
        self.command("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} did not end within {timeout} s: {self.job(job_id)}\n{self.log(job_id)}")

    def log(self, job_id: int) -> str:
        """The job's output file, written by the template to Results/slurm-<name>-<id>.out."""
        found = list((self.submit_dir / "Results").glob(f"slurm-*-{job_id}.out"))
        return found[0].read_text(errors="replace") if found else "(no job log)"

    def run_job(self, template: str, *args: str, options: tuple[str, ...] = (), capsys=None) -> str:
        """Submit, wait for the end, require success; the job's log (shown in the CI log without progress bars)."""
        job_id = self.sbatch(template, *args, options=options)
        job = self.wait(job_id)
        output = self.log(job_id)
        if capsys is not None:
            show_in_ci_log(capsys, job_summary(job_id, template, job, output))
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output + self.daemon_logs()
        return output


def job_summary(job_id: int, template: str, job: dict[str, str], output: str) -> str:
    """The job's state and its log without tqdm's progress bars, for the CI log."""
    lines = [line.rstrip() for line in output.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    head = f"--- Slurm job {job_id}, slurm/{template}.sbatch: {job['JobState']}, exit {job['ExitCode']}, " \
           f"restarts {job['Restarts']} ---"
    if len(lines) > 20:
        lines = [*lines[:15], f"... ({len(lines) - 15} more lines in Results/slurm-*-{job_id}.out)"]
    return "\n".join([head, *lines])


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):  # slurmd, slurmctld, then munged
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("slurm")
    folder.chmod(0o711)  # munged refuses a socket folder others may write to
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    (folder / "slurm.conf").write_text(slurm_conf(folder, free_ports(2)))
    devices = stand_in_gpus(folder)
    (folder / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={folder}/gpu[0-{len(devices) - 1}]\n")
    env = clean_environment(SLURM_CONF=str(folder / "slurm.conf"), PATH=SEARCH_PATH, SITE_CONDA_ENV="",
                            SITE_MODULES="", PYTHON=sys.executable)
    submit_dir = folder / "repo"
    submit_dir.mkdir()
    for name in ("main.py", "guided_diffusion", "slurm", "evaluation"):
        (submit_dir / name).symlink_to(REPO / name)
    (submit_dir / "Results").mkdir()

    def binary(name: str) -> str:
        return shutil.which(name, path=SEARCH_PATH)

    processes: list[subprocess.Popen] = []
    try:
        processes.append(start([binary("munged"), "--foreground", "--force", f"--socket={folder}/munge.socket",
                                f"--key-file={key}", f"--pid-file={folder}/munged.pid",
                                f"--seed-file={folder}/munged.seed", f"--log-file={folder}/munged.log"],
                               folder / "munged.out"))
        conf = str(folder / "slurm.conf")
        processes.append(start([binary("slurmctld"), "-D", "-f", conf], folder / "slurmctld.out"))
        processes.append(start([binary("slurmd"), "-D", "-f", conf, "-N", "localhost"], folder / "slurmd.out"))
        result = Cluster(folder, env, submit_dir)
        deadline = time.monotonic() + 60
        while True:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True,
                                    timeout=30).stdout.split()
            if states == ["idle"]:
                break
            dead = [p.args[0] for p in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm did not start (node states {states}, exited: {dead})"
                                   f"{result.daemon_logs()}")
            time.sleep(0.5)
        yield result
        result.command("scancel", "--user=root", check=False)
    finally:
        stop(processes)


# --------------------------------------------------------------------------------------------------------------


def test_templates_keep_site_lines_at_the_top_and_every_sbatch_line_above_the_first_command():
    for name in ("train", "finetune", "sample", "evaluate"):
        lines = (REPO / "slurm" / f"{name}.sbatch").read_text().splitlines()
        first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
        assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH")), name
        assert lines[first_command].startswith("SITE_MODULES="), name
        site = [line for line in lines[:first_command] if line.startswith(("#SBATCH --partition", "##SBATCH --account",
                                                                          "#SBATCH --gres"))]
        assert len(site) == 3, name
        for directive in ("--requeue", "--output=Results/", "--open-mode=append", "--signal=USR1@"):
            assert any(line.startswith(f"#SBATCH {directive}") for line in lines), (name, directive)
        subprocess.run(["bash", "-n", str(REPO / "slurm" / f"{name}.sbatch")], check=True)


def test_sample_template_with_srun_over_two_tasks_writes_the_files_of_one_process(cluster, demo_dir, tmp_path,
                                                                                  reference, capsys):
    config = write_json_file(tmp_path / "sample.json",
                             sampling_values(demo_dir, reference.checkpoint, tmp_path / "runs"))
    output = cluster.run_job("sample", str(config), options=(f"--ntasks-per-node={PROCESSES}",), capsys=capsys)
    assert "2 task(s)" in output and "sample finished with status 0" in output
    assert output.count("run folder:") == 1  # rank 0 alone logs
    [run_dir] = (tmp_path / "runs").iterdir()
    show_in_ci_log(capsys, f"slurm/sample.sbatch, srun 2 tasks vs 1 process: {assert_same_samples(run_dir, reference)}")


def test_sample_template_stopped_before_the_time_limit_continues_its_run_folder_to_the_files_of_one_process(
        cluster, demo_dir, tmp_path, reference, capsys):
    """SIGUSR1 to both tasks (what `--signal=USR1@300` sends before the time limit) once the first image is
    written: each stops after the batch under way, all exit with status 75, the template requeues the job, and
    the requeued job (auto_resume) samples the batches left into the same folder, which ends as one uninterrupted
    process leaves its own."""
    values = {**sampling_values(demo_dir, reference.checkpoint, tmp_path / "runs"), "num_samples": 12,
              "timestep_respacing": "100"}  # 6 batches of 2, long enough for the signal to find some left
    config = write_json_file(tmp_path / "sample.json", values)
    job_id = cluster.sbatch("sample", str(config), options=(f"--ntasks-per-node={PROCESSES}",))
    run_dir = tmp_path / "runs" / "sample_001"
    wait_for_steps(cluster, job_id, run_dir / "sampled.txt", 0)  # the first image written: batches under way
    cluster.command("scancel", "--signal=USR1", str(job_id))
    job = cluster.wait(job_id)
    output = cluster.log(job_id)
    show_in_ci_log(capsys, job_summary(job_id, "sample", job, output))
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output + cluster.daemon_logs()
    written = re.search(r"stopped by SIGUSR1 with (\d+) of 12 images written", output)
    assert written and 2 <= int(written[1]) <= 10 and output.count("requeueing job") == 1, output  # whole batches
    kept = int(written[1])
    resumed = f"({kept} kept from the stopped run, {12 - kept} to go)"
    assert f"auto_resume: continuing {run_dir}" in output and resumed in output
    assert [run.name for run in (tmp_path / "runs").iterdir()] == ["sample_001"]

    with one_thread():
        one_config, _ = config_from_dict("sample", {**values, "root_log_dir": str(tmp_path / "one")})
        one_process = Path(run_sampling(one_config, log=silent)["run_dir"])
    digest = folder_digest(run_dir)
    assert len(digest) == 4 * 12 + 1 and digest == folder_digest(one_process)
    show_in_ci_log(capsys, f"slurm/sample.sbatch, 2 tasks stopped by SIGUSR1 after {kept} of 12 images and requeued: "
                           f"{len(digest)} files byte-identical to one uninterrupted process")


def test_finetune_template_starts_from_the_trained_weights(cluster, demo_dir, tmp_path, reference, capsys):
    values = {**training_values(demo_dir, tmp_path / "runs", max_steps=1),
              "resume_checkpoint": str(reference.train_dir)}
    config = write_json_file(tmp_path / "finetune.json", values)
    output = cluster.run_job("finetune", str(config), capsys=capsys)
    assert f"initialised weights from {reference.train_dir}/checkpoints/best.pt" in output
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name == "finetune_001"
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["action"] == "finetune"


def test_evaluate_template_runs_the_evaluation_script(cluster, capsys):
    output = cluster.run_job("evaluate", "--help", capsys=capsys)
    assert "usage:" in output and "evaluate finished with status 0" in output


def wait_for_steps(cluster: Cluster, job_id: int, log_csv: Path, steps: int) -> None:
    """Wait until the run writing `log_csv` has logged `steps` steps (the job must keep running meanwhile)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (log_csv.is_file() and len(log_csv.read_text().splitlines()) > steps):  # a header, then a row a step
        # A requeue passes through COMPLETING (and REQUEUED) on its way back to PENDING: only an ended job fails.
        assert time.monotonic() < deadline and cluster.job(job_id)["JobState"] not in ENDED_STATES, \
            cluster.log(job_id)
        time.sleep(0.1)


def test_train_template_over_two_srun_tasks_stopped_twice_resumes_and_trains_like_one_process(
        cluster, demo_dir, tmp_path, reference, capsys):
    """The train template with 2 tasks (srun), stopped twice mid-training:
    1. SIGUSR1 to the tasks (`scancel --signal=USR1`, what `--signal=USR1@300` sends before the time limit):
       training saves latest.pt and exits with 75, and the template requeues the job itself;
    2. `scontrol requeue`, which does what a preemption does: SIGTERM to every task and the job back in the queue.
    Each rerun resumes from the latest.pt before it, and the job ends with the weights and step losses of one
    uninterrupted process with the same global batch. (One job for all of it: each job start costs seconds.)"""
    config = write_json_file(tmp_path / "train.json", training_values(demo_dir, tmp_path / "runs"))
    job_id = cluster.sbatch("train", str(config), options=(f"--ntasks-per-node={PROCESSES}",))
    runs = [tmp_path / "runs" / f"train_{n:03d}" for n in (1, 2, 3)]
    wait_for_steps(cluster, job_id, runs[0] / "log.csv", 1)
    cluster.command("scancel", "--signal=USR1", str(job_id))
    wait_for_steps(cluster, job_id, runs[1] / "log.csv", 1)
    cluster.command("scontrol", "requeue", str(job_id))
    job = cluster.wait(job_id)
    output = cluster.log(job_id)
    show_in_ci_log(capsys, job_summary(job_id, "train", job, output))
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", output + cluster.daemon_logs()
    assert "restart 0: train on 1 node(s) [localhost], 2 task(s)" in output and "restart 2:" in output
    assert output.count("with 2 processes: global batch 4 = batch_size 2 per process x 2 processes") == 3
    assert output.count("requeueing job") == 2 and output.rstrip().endswith("train finished with status 0")

    stops = [json.loads((run / "summary.json").read_text()) for run in runs]
    first, second = stops[0]["steps"], stops[1]["steps"]
    assert 1 <= first < second < STEPS
    assert stops[0]["stop_reason"].startswith(f"stopped by SIGUSR1 after step {first}: latest.pt saved")
    assert stops[1]["stop_reason"].startswith(f"stopped by SIGTERM after step {second}: latest.pt saved")
    assert stops[2]["stop_reason"] == "max_steps reached"
    for run, step in ((runs[0], first), (runs[1], second)):
        latest = run / "checkpoints" / "latest.pt"
        assert load_checkpoint(latest)["train_state"]["step"] == step
        assert f"resuming exactly from {latest} (step {step}," in output
    weights = assert_weights_like_one_process(runs[2], reference)
    # The three runs' step logs together are the uninterrupted run's log: no step lost or done twice.
    logged = {column: [value for run in runs for value in read_csv_column(run / "log.csv", column)]
              for column in ("step", "loss")}
    assert logged["step"] == list(range(1, STEPS + 1))
    losses = assert_losses_like_one_process(logged["loss"], read_csv_column(reference.train_dir / "log.csv", "loss"),
                                            "step")
    show_in_ci_log(capsys, f"slurm/train.sbatch, srun 2 tasks x batch 2, stopped after steps {first} (SIGUSR1) and "
                           f"{second} (SIGTERM), vs 1 process x batch 4, {STEPS} steps: {weights}, {losses}")

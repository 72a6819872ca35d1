"""Several processes, one run: the launcher's environment, DDP training that equals one process with the same
global batch, sampling split across ranks that writes the files of one process, stop signals; through
torch.multiprocessing (gloo), torchrun and mpirun.

Every multi-process run here is 2 CPU processes with gloo, one thread each, on the tiny model. The one-process
reference runs in this process with one thread too, so that rounding is comparable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_train_config
from guided_diffusion import distributed
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.config import config_from_dict
from guided_diffusion.distributed import (Launch, LaunchError, StopSignals, World, first_host, launch_from_mpi,
                                          process_group, read_launch, shard_bounds)
from guided_diffusion.sampling.sample import run_sampling
from guided_diffusion.train import Trainer

REPO = Path(__file__).resolve().parents[1]
PROCESSES, PER_PROCESS_BATCH, STEPS = 2, 2, 9
SAMPLE_FOLDERS = ("images", "labels", "colored_labels", "samples")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SDM_LAUNCHER", "PMI_SIZE")
MOVED_TOLERANCE = 1e-2
"""N processes sum the gradient in another order than one process, so it agrees to float rounding only (checked
at 1e-5 on the first step). Adam divides by sqrt(v), which makes that rounding large for near-zero gradients, and
the runs drift apart a little more each step. So weights are compared relative to how far training moved them:
measured 3e-4 after 4 steps and 1.3e-3 after 12; a rank training on the wrong rows or with other noise is off by
order 1. (Adam ignores a gradient's scale: the first-step gradient check is what catches a wrong loss scaling.)"""
LOSS_TOLERANCE = 5e-5
"""Relative agreement of the logged step and epoch losses over the STEPS steps (measured: at most 4e-6 in 12)."""


def silent(*_args) -> None:
    pass


def training_values(demo_dir: Path, root: Path, batch_size: int = PER_PROCESS_BATCH, **changes) -> dict:
    """10 training images, global batch 4: 3 epochs of 4 + 4 + 2 images, so the runs cross epoch ends and split
    a last partial batch."""
    values = {"batch_size": batch_size, "max_steps": STEPS, "max_epochs": 100, "save_interval": 5, "log_interval": 1}
    return tiny_train_config(demo_dir, root, **{**values, **changes})


def sampling_values(demo_dir: Path, model_path: Path, root: Path) -> dict:
    """5 images in batches of 2: two processes take batches 0 and 2, and batch 1."""
    return {"data_dir": str(demo_dir), "model_path": str(model_path), "root_log_dir": str(root),
            "num_samples": 5, "batch_size": 2, "timestep_respacing": "4", "s": 1.5, "mask_split": "train"}


def write_json_file(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may run inside a Slurm job), one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "OMPI_", "PMIX_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sigterm_on_call(forward, call: int):
    """`forward` that sends this process SIGTERM during its `call`-th call (i.e. during that training step)."""
    calls = []

    def wrapped(*args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*args)

    return wrapped


def record_first_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The gradients the optimiser receives at the first step (filled in while the trainer runs)."""
    gradients: dict[str, torch.Tensor] = {}

    def keep(_optimizer, _args, _kwargs) -> None:
        if not gradients:
            gradients.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(keep)
    return gradients


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        start: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a - start|| over all tensors: how far apart two runs are, relative to how far they moved."""
    apart = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    moved = sum(float((a[k].double() - start[k].double()).pow(2).sum()) for k in a) ** 0.5
    return apart / moved


def read_csv_column(path: Path, column: str) -> list[float]:
    lines = path.read_text().splitlines()
    index = lines[0].split(",").index(column)
    return [float(line.split(",")[index]) for line in lines[1:]]


def folder_digest(run_dir: Path) -> dict[str, str]:
    """sha256 of every sample file and of the grid, by path inside the run folder."""
    files = [p for folder in SAMPLE_FOLDERS for p in sorted((run_dir / folder).glob("*.png"))]
    files.append(run_dir / "grid.png")
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@dataclass
class Reference:
    """One process with the global batch (PROCESSES x PER_PROCESS_BATCH): the run the others must equal."""

    train_dir: Path
    initial: dict[str, torch.Tensor]
    first_gradients: dict[str, torch.Tensor]
    sample_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.train_dir / "checkpoints" / "latest.pt"


@pytest.fixture(scope="session")
def reference(demo_dir, tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("one_process")
    with one_thread():
        config, _ = config_from_dict("train", training_values(demo_dir, root / "train",
                                                              batch_size=PROCESSES * PER_PROCESS_BATCH))
        trainer = Trainer(config, "train", log=silent)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        gradients = record_first_gradients(trainer)
        result = trainer.run()
        sample_config, _ = config_from_dict("sample", sampling_values(demo_dir, result.latest_checkpoint,
                                                                      root / "sample"))
        sample_dir = Path(run_sampling(sample_config, log=silent)["run_dir"])
    return Reference(result.run_dir, initial, gradients, sample_dir)


def assert_weights_like_one_process(run_dir: Path, reference: Reference) -> str:
    """latest.pt of `run_dir` is at STEPS with the reference's weights (see MOVED_TOLERANCE); what was measured."""
    latest = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    expected = load_checkpoint(reference.checkpoint)
    assert latest["train_state"]["step"] == expected["train_state"]["step"] == STEPS
    apart = {net: relative_difference(latest[net], expected[net], reference.initial) for net in ("model", "ema")}
    assert max(apart.values()) < MOVED_TOLERANCE, apart
    return f"weights apart {max(apart.values()):.1e} of the distance moved (limit {MOVED_TOLERANCE:g})"


def assert_losses_like_one_process(losses: list[float], expected: list[float], name: str) -> str:
    assert losses == pytest.approx(expected, rel=LOSS_TOLERANCE), name
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
    return f"{len(losses)} {name} losses within {worst:.1e} (limit {LOSS_TOLERANCE:g})"


def assert_trains_like_one_process(run_dir: Path, reference: Reference) -> str:
    """Weights, step losses and epoch losses (all-reduced over ranks) as one process's; what was measured."""
    measured = [assert_weights_like_one_process(run_dir, reference)]
    for log, name in (("log.csv", "step"), ("epochs.csv", "epoch")):
        measured.append(assert_losses_like_one_process(read_csv_column(run_dir / log, "loss"),
                                                       read_csv_column(reference.train_dir / log, "loss"), name))
    return ", ".join(measured)


def assert_same_samples(run_dir: Path, reference: Reference) -> str:
    digest = folder_digest(run_dir)
    assert len(digest) == 4 * 5 + 1
    assert digest == folder_digest(reference.sample_dir)
    assert json.loads((run_dir / "summary.json").read_text())["num_samples"] == 5
    return f"{len(digest)} files (5 samples x images/labels/colored_labels/samples + grid) byte-identical"


def show_in_ci_log(capsys, text: str) -> None:
    """Print `text` past pytest's capture, so the CI log shows what a multi-process test measured."""
    with capsys.disabled():
        print(f"\n{text}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Reading the launcher's environment
# --------------------------------------------------------------------------------------------------------------

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
SRUN = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08,11],cpu1", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8"}


def test_no_launcher_is_one_process_without_a_group():
    assert read_launch({}) == distributed.SINGLE_PROCESS
    assert not read_launch({"PATH": "/bin", "MASTER_ADDR": "x"}).distributed
    with process_group({}) as launch:
        assert launch.world_size == 1 and not torch.distributed.is_initialized()


def test_torchrun_variables_give_rank_world_size_and_rendezvous():
    assert read_launch(TORCHRUN) == Launch("torchrun", 1, 4, 1, "node7", 29400)


def test_open_mpi_variables_on_one_node_meet_on_localhost():
    assert read_launch(OPEN_MPI) == Launch("openmpi", 3, 4, 1, "127.0.0.1", distributed.DEFAULT_MASTER_PORT)
    assert read_launch({**OPEN_MPI, "MASTER_PORT": "3000"}).master_port == 3000


def test_open_mpi_over_several_nodes_needs_master_addr():
    several_nodes = {**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchError, match=r"span several nodes but MASTER_ADDR is not set; pass `mpirun -x"):
        read_launch(several_nodes)
    assert read_launch({**several_nodes, "MASTER_ADDR": "n1"}).master_addr == "n1"


def test_srun_variables_meet_on_the_first_host_of_the_step_at_a_port_of_the_job():
    launch = read_launch(SRUN)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 5, 8, 1)
    assert launch.master_addr == "gpu07"
    assert launch.master_port == read_launch({**SRUN, "SLURM_PROCID": "0"}).master_port  # same for every task
    assert launch.master_port != read_launch({**SRUN, "SLURM_JOB_ID": "4243"}).master_port
    assert read_launch({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).init_method == "tcp://10.0.0.1:1234"


def test_a_slurm_batch_script_without_srun_is_one_process():
    batch_step = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    assert read_launch({**batch_step, "SLURM_PROCID": "0"}) == distributed.SINGLE_PROCESS


def test_nested_launchers_are_read_innermost_first():
    assert read_launch({**SRUN, **TORCHRUN}).launcher == "torchrun"  # torchrun started by srun
    assert read_launch({**SRUN, **OPEN_MPI}).launcher == "openmpi"  # mpirun inside a Slurm allocation


def test_sdm_launcher_forces_a_reading():
    assert read_launch({**TORCHRUN, "SDM_LAUNCHER": "none"}) == distributed.SINGLE_PROCESS
    assert read_launch({**SRUN, **TORCHRUN, "SDM_LAUNCHER": "slurm"}).launcher == "slurm"
    with pytest.raises(LaunchError, match=r"^SDM_LAUNCHER='pbs' is not one of auto, torchrun, openmpi, slurm"):
        read_launch({"SDM_LAUNCHER": "pbs"})


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "0"}, r"^launcher environment \(torchrun\) is half set: RANK set but WORLD_SIZE missing; start with "
                    r"torchrun"),
    ({"LOCAL_RANK": "0"}, r"is half set: LOCAL_RANK set but RANK, WORLD_SIZE missing"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, r"is half set: RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT "
                                       r"missing"),
    ({**TORCHRUN, "RANK": "4"}, r"^launcher environment \(torchrun\): rank 4 is not below the world size 4"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not a non-negative integer"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, r"\(openmpi\) is half set: OMPI_COMM_WORLD_RANK set but OMPI_COMM_WORLD_SIZE, "
                                    r"OMPI_COMM_WORLD_LOCAL_RANK missing"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}, r"\(slurm\) is half set: .* SLURM_LOCALID missing"),
    ({"PMI_SIZE": "4"}, r"not Open MPI \(PMI_SIZE=4\); set SDM_LAUNCHER=mpi4py"),
])
def test_a_half_set_launcher_environment_is_one_clear_error(env, message):
    with pytest.raises(LaunchError, match=message) as error:
        read_launch(env)
    assert "\n" not in str(error.value)


def test_main_reports_a_half_set_environment_in_one_line_and_exits_2(demo_dir, tmp_path, monkeypatch, capsys):
    import main
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    config = write_json_file(tmp_path / "train.json", training_values(demo_dir, tmp_path / "runs"))
    assert main.main(["train", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: launcher environment (torchrun) is half set: RANK set but WORLD_SIZE missing")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_first_host_of_a_slurm_node_list():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("rack[1-2]-node[001-004]") == "rack1-node001"
    assert first_host("localhost") == "localhost"
    assert first_host("a,b[1-2]") == "a"
    with pytest.raises(LaunchError, match="cannot read a host name from node list"):
        first_host("gpu[07")


class FakeCommunicator:
    """mpi4py's interface as launch_from_mpi uses it; bcast hands out what rank 0 would have sent."""

    def __init__(self, rank: int, size: int, from_rank0=None):
        self.rank, self.size, self.from_rank0 = rank, size, from_rank0

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def bcast(self, value, root: int = 0):
        assert root == 0
        return value if self.rank == 0 else self.from_rank0


def test_mpi4py_rank_0_sends_its_host_and_a_free_port():
    launch = launch_from_mpi(FakeCommunicator(0, 4), FakeCommunicator(0, 2), {})
    assert (launch.launcher, launch.rank, launch.world_size) == ("mpi4py", 0, 4)
    assert launch.master_addr == socket.gethostname() and 0 < launch.master_port < 65536
    other = launch_from_mpi(FakeCommunicator(3, 4, ("node1", 4000)), FakeCommunicator(1, 2), {})
    assert other == Launch("mpi4py", 3, 4, 1, "node1", 4000)
    assert launch_from_mpi(FakeCommunicator(0, 4), FakeCommunicator(0, 2),
                           {"MASTER_ADDR": "n9", "MASTER_PORT": "5000"}).init_method == "tcp://n9:5000"


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is not None, reason="mpi4py is installed here")
def test_mpi4py_asked_for_but_missing_is_a_clear_error():
    with pytest.raises(LaunchError, match="SDM_LAUNCHER=mpi4py but mpi4py is not installed"):
        read_launch({"SDM_LAUNCHER": "mpi4py"})


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_batch_slices_cover_the_batch_once_with_sizes_within_one(size):
    for count in range(10):
        bounds = [shard_bounds(count, World(rank, size)) for rank in range(size)]
        assert [i for start, stop in bounds for i in range(start, stop)] == list(range(count))
        lengths = [stop - start for start, stop in bounds]
        assert max(lengths) - min(lengths) <= 1


def test_sampling_batches_are_dealt_in_turn():
    batches = range(0, 11, 2)
    shares = [World(rank, 2).share(batches) for rank in range(2)]
    assert shares == [[0, 4, 8], [2, 6, 10]]


# --------------------------------------------------------------------------------------------------------------
# Stop signals
# --------------------------------------------------------------------------------------------------------------

def test_stop_signals_are_recorded_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received == "SIGUSR1"  # the first one names the stop
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_ends_training_after_the_step_with_latest_saved(demo_dir, tmp_path):
    config, _ = config_from_dict("train", training_values(demo_dir, tmp_path, batch_size=4))
    trainer = Trainer(config, "train", log=silent)
    trainer.forward = sigterm_on_call(trainer.forward, 2)
    result = trainer.run()
    assert result.stop_signal == "SIGTERM" and result.state.step == 2
    assert result.stop_reason.startswith("stopped by SIGTERM after step 2: latest.pt saved")
    assert load_checkpoint(result.latest_checkpoint)["train_state"]["step"] == 2
    assert json.loads((result.run_dir / "summary.json").read_text())["stop_reason"] == result.stop_reason


# --------------------------------------------------------------------------------------------------------------
# Two gloo processes (torch.multiprocessing)
# --------------------------------------------------------------------------------------------------------------

def _spawned(rank: int, port: int, demo_dir: Path, root: Path) -> None:
    """One of two ranks: train, recording the first step's gradients; rank 1 sends itself SIGTERM in step 3."""
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(PROCESSES), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    with process_group(env):
        config, _ = config_from_dict("train", training_values(demo_dir, root / "train"))
        trainer = Trainer(config, "train", log=silent)
        gradients = record_first_gradients(trainer)
        if rank == 1:
            trainer.forward = sigterm_on_call(trainer.forward, 3)
        result = trainer.run()
        torch.save({"gradients": gradients, "stop_signal": result.stop_signal}, root / f"rank{rank}.pt")


def test_two_gloo_processes_step_with_the_gradient_of_one_process_and_stop_together(demo_dir, tmp_path, reference,
                                                                                   capsys):
    """DDP's average of the ranks' slices is the global batch's gradient (to float rounding: 1e-5); and a stop
    signal that reaches one rank only stops every rank after the same step, with latest.pt saved by rank 0.
    (One spawn for both: starting processes is what costs here.)"""
    mp.spawn(_spawned, args=(free_port(), demo_dir, tmp_path), nprocs=PROCESSES, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(PROCESSES)]
    worst = 0.0
    for rank in ranks:
        for name, expected in reference.first_gradients.items():
            got = rank["gradients"][name]
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7 * expected.abs().max()), name
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)))
    assert [rank["stop_signal"] for rank in ranks] == ["a stop signal on another rank", "SIGTERM"]
    [train_dir] = (tmp_path / "train").iterdir()  # rank 0 alone made a run folder
    assert load_checkpoint(train_dir / "checkpoints" / "latest.pt")["train_state"]["step"] == 3
    assert json.loads((train_dir / "summary.json").read_text())["stop_reason"].startswith("stopped by a stop signal")
    assert len(read_csv_column(train_dir / "log.csv", "loss")) == 3
    assert len(list((train_dir / "tensorboard").iterdir())) == 1  # rank 0 alone writes TensorBoard events
    show_in_ci_log(capsys, f"torch.multiprocessing, 2 gloo processes x batch 2 vs 1 process x batch 4: first-step "
                           f"gradients within {worst:.1e} of each tensor's largest entry; SIGTERM to rank 1 in step 3 "
                           "stopped both ranks after step 3 with latest.pt saved")


# --------------------------------------------------------------------------------------------------------------
# Launchers: torchrun and mpirun run main.py
# --------------------------------------------------------------------------------------------------------------

def run_command(command: list[str], env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        causes = [line for line in output.splitlines() if "Error" in line or "error:" in line]
        pytest.fail(f"{' '.join(command)} exited with {result.returncode}; error lines: {causes[:20]}\n"
                    f"output (end):\n{output[-4000:]}")
    return output


def launched_train_and_sample(launcher: list[str], env: dict[str, str], demo_dir: Path, root: Path,
                              reference: Reference, **train_changes) -> tuple[Path, Path, str]:
    """`launcher main.py train` then `launcher main.py sample` with 2 processes; the run folders and the log."""
    train_config = write_json_file(root / "train.json", training_values(demo_dir, root / "train", **train_changes))
    output = run_command([*launcher, "main.py", "train", "-c", str(train_config)], env)
    sample_config = write_json_file(root / "sample.json",
                                    sampling_values(demo_dir, reference.checkpoint, root / "sample"))
    output += run_command([*launcher, "main.py", "sample", "-c", str(sample_config)], env)
    [train_dir], [sample_dir] = (root / "train").iterdir(), (root / "sample").iterdir()
    return train_dir, sample_dir, output


def test_torchrun_launches_two_processes_that_train_and_sample_like_one(demo_dir, tmp_path, reference, capsys):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}"]
    train_dir, sample_dir, output = launched_train_and_sample(launcher, clean_environment(), demo_dir, tmp_path,
                                                              reference)
    assert "with 2 processes: global batch 4 = batch_size 2 per process x 2 processes" in output
    assert output.count("run folder:") == 2  # rank 0 alone logs: one train, one sample
    trained = assert_trains_like_one_process(train_dir, reference)
    sampled = assert_same_samples(sample_dir, reference)
    show_in_ci_log(capsys, f"torchrun, 2 gloo processes x batch 2 vs 1 process x batch 4, {STEPS} steps: {trained}; "
                           f"sampling: {sampled}")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (Open MPI) is not installed; .ci/run installs it")
def test_mpirun_launches_two_processes_that_train_and_sample_like_one(demo_dir, tmp_path, reference, capsys):
    env = clean_environment(MASTER_PORT=str(free_port()), OMPI_ALLOW_RUN_AS_ROOT="1",
                            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    launcher = ["mpirun", "-np", str(PROCESSES), "-x", "MASTER_PORT", "-x", "OMP_NUM_THREADS", sys.executable]
    # microbatch 1: each rank accumulates its slice in two backward passes and all-reduces once (DDP no_sync)
    train_dir, sample_dir, output = launched_train_and_sample(launcher, env, demo_dir, tmp_path, reference,
                                                              microbatch=1)
    assert "with 2 processes: global batch 4" in output
    trained = assert_trains_like_one_process(train_dir, reference)
    sampled = assert_same_samples(sample_dir, reference)
    show_in_ci_log(capsys, f"mpirun, 2 gloo processes x batch 2 (microbatch 1) vs 1 process x batch 4, {STEPS} steps: "
                           f"{trained}; sampling: {sampled}")

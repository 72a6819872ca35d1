"""Several processes, one run: the process group read from the launcher's environment.

`main.py` runs unchanged as one process or as N processes started by a launcher. Each launcher tells a process
where it sits through environment variables, read here by one pure function, :func:`read_launch`:

- torchrun: RANK, WORLD_SIZE, LOCAL_RANK; rank 0 at MASTER_ADDR:MASTER_PORT (torchrun sets all five).
- Open MPI's mpirun: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK; rank 0 at MASTER_ADDR (127.0.0.1 when all
  processes share one node, required otherwise) and MASTER_PORT (default 29500).
- Slurm's srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; rank 0 at MASTER_ADDR or the first host of
  SLURM_STEP_NODELIST, at MASTER_PORT or a port derived from the job and step ids (the same for every task).
- mpi4py (only with SDM_LAUNCHER=mpi4py): COMM_WORLD's rank and size, the rank within the node's shared-memory
  communicator; rank 0 sends its host name and a free port to every rank.

They are tried in that order, because launchers nest: torchrun started by srun sees both sets, and its own
(RANK, ...) describe the process; mpirun inside a Slurm allocation inherits the batch step's SLURM_* variables.
Slurm counts only inside an srun step (SLURM_STEP_NUM_TASKS): the batch script itself also carries SLURM_PROCID
and SLURM_NTASKS, yet it is a single process. `SDM_LAUNCHER` (auto, torchrun, openmpi, slurm, mpi4py, none)
forces one reading; mpi4py is only used when asked for, since importing MPI in every process is what made
ISDM's launches hard to debug. Processes started by another MPI (PMI_SIZE > 1) without it are refused, rather
than each training alone.

One process is no process group at all: a plain `python main.py ...` never initialises torch.distributed.
With N processes the group uses gloo on CPU and NCCL for CUDA tensors. The helpers below (rank, gather,
broadcast) read the state of that group, so modules need no extra argument to know where they run, and they
are cheap no-ops in a single process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import LaunchError

T = TypeVar("T")

LAUNCHERS = ("auto", "torchrun", "openmpi", "slurm", "mpi4py", "none")
REQUEUE_EXIT_STATUS = 75
"""Exit status of a training run stopped by SIGTERM/SIGUSR1 after saving its checkpoint (sysexits' EX_TEMPFAIL:
try again later). The sbatch templates requeue the job when `srun` returns it."""

DEFAULT_MASTER_PORT = 29500
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 12000  # below Linux's ephemeral range (32768+)
_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launch: rank among world_size processes, local_rank on its node, and the
    address rank 0 listens on for the rendezvous."""

    launcher: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


SINGLE_PROCESS = Launch()


# ----------------------------------------------------------------------------------------------------------
# Reading the environment (pure functions)
# ----------------------------------------------------------------------------------------------------------


def _integer(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env[name].strip()
    if not re.fullmatch(r"\d+", value):
        raise LaunchError(f"launcher environment ({launcher}): {name}={env[name]!r} is not a non-negative integer")
    return int(value)


def _require_all(env: Mapping[str, str], names: Sequence[str], launcher: str, hint: str,
                 related: Sequence[str] = ()) -> None:
    """Every one of `names` is set; otherwise one line naming what is set (of `names` and `related`) and what
    is missing."""
    missing = [n for n in names if not env.get(n, "").strip()]
    if not missing:
        return
    given = [n for n in dict.fromkeys((*names, *related)) if n not in missing and env.get(n, "").strip()]
    state = f"is half set: {', '.join(given)} set but" if given else "has"
    raise LaunchError(f"launcher environment ({launcher}) {state} {', '.join(missing)} missing; {hint}")


def _checked(launch: Launch, names: str) -> Launch:
    if launch.world_size < 1:
        raise LaunchError(f"launcher environment ({launch.launcher}): world size is 0 ({names})")
    if launch.rank >= launch.world_size:
        raise LaunchError(f"launcher environment ({launch.launcher}): rank {launch.rank} is not below the world "
                          f"size {launch.world_size} ({names})")
    if not 0 < launch.master_port < 65536:
        raise LaunchError(f"launcher environment ({launch.launcher}): MASTER_PORT={launch.master_port} is not a "
                          "TCP port (1-65535)")
    return launch


def _master_port(env: Mapping[str, str], launcher: str, default: int) -> int:
    return _integer(env, "MASTER_PORT", launcher) if env.get("MASTER_PORT", "").strip() else default


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list: 'gpu[07-09,12],cpu3' -> 'gpu07', 'r[1-2]-n[01-04]' -> 'r1-n01'.

    Only the first host is needed (rank 0 runs there: Slurm gives task 0 to the first node of the step), so
    each bracket contributes its first number or range start, padding kept."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0].strip(), entry)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"launcher environment (slurm): cannot read a host name from node list {nodelist!r}")
    return host


def _from_torchrun(env: Mapping[str, str]) -> Launch:
    names = ("RANK", "WORLD_SIZE")
    hint = "start with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, or unset them"
    _require_all(env, names, "torchrun", hint, related=("LOCAL_RANK",))
    world_size = _integer(env, "WORLD_SIZE", "torchrun")
    if world_size > 1:
        _require_all(env, names + ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"), "torchrun", hint)
    rank = _integer(env, "RANK", "torchrun")
    local_rank = _integer(env, "LOCAL_RANK", "torchrun") if env.get("LOCAL_RANK", "").strip() else rank
    return _checked(Launch("torchrun", rank, world_size, local_rank, env.get("MASTER_ADDR", "127.0.0.1").strip(),
                           _master_port(env, "torchrun", DEFAULT_MASTER_PORT)), "RANK, WORLD_SIZE")


def _from_openmpi(env: Mapping[str, str]) -> Launch:
    names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
    _require_all(env, names, "openmpi", "start with mpirun (Open MPI), or unset them")
    rank, world_size, local_rank = (_integer(env, n, "openmpi") for n in names)
    local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").strip()
    one_node = local_size.isdigit() and int(local_size) == world_size
    address = env.get("MASTER_ADDR", "").strip()
    if not address:
        if world_size > 1 and not one_node:
            raise LaunchError("launcher environment (openmpi): the processes span several nodes but MASTER_ADDR is "
                              "not set; pass `mpirun -x MASTER_ADDR=<first node> ...` or set SDM_LAUNCHER=mpi4py")
        address = "127.0.0.1"
    return _checked(Launch("openmpi", rank, world_size, local_rank, address,
                           _master_port(env, "openmpi", DEFAULT_MASTER_PORT)), "OMPI_COMM_WORLD_RANK, _SIZE")


def _from_slurm(env: Mapping[str, str]) -> Launch:
    names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    _require_all(env, names, "slurm", "start the processes with srun inside a Slurm job, or unset them")
    rank, world_size, local_rank = (_integer(env, n, "slurm") for n in names)
    address = env.get("MASTER_ADDR", "").strip()
    if not address:
        nodelist = env.get("SLURM_STEP_NODELIST", "").strip() or env.get("SLURM_JOB_NODELIST", "").strip()
        if not nodelist:
            if world_size > 1:
                raise LaunchError("launcher environment (slurm): SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are "
                                  "both missing, so rank 0's host is unknown; set MASTER_ADDR")
            nodelist = "127.0.0.1"
        address = first_host(nodelist)
    job = _integer(env, "SLURM_JOB_ID", "slurm") if env.get("SLURM_JOB_ID", "").strip() else 0
    step = _integer(env, "SLURM_STEP_ID", "slurm") if env.get("SLURM_STEP_ID", "").strip() else 0
    # Every task of a step computes the same port; jobs sharing a node get different ones.
    default_port = _SLURM_PORT_BASE + (job * 17 + step) % _SLURM_PORT_SPAN
    return _checked(Launch("slurm", rank, world_size, local_rank, address,
                           _master_port(env, "slurm", default_port)), "SLURM_PROCID, SLURM_STEP_NUM_TASKS")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def launch_from_mpi(comm: Any, local_comm: Any, env: Mapping[str, str]) -> Launch:
    """The launch described by an MPI communicator (mpi4py's COMM_WORLD) and its shared-memory (node-local)
    sub-communicator. Rank 0 sends its host name and a free port to every rank, unless MASTER_ADDR/PORT are
    set; this is what makes mpi4py useful with MPIs that export no rank variables (MPICH, Intel MPI)."""
    rank, world_size = comm.Get_rank(), comm.Get_size()
    address = env.get("MASTER_ADDR", "").strip()
    port = _master_port(env, "mpi4py", 0)
    mine = (address or socket.gethostname(), port or _free_port()) if rank == 0 else None
    address, port = comm.bcast(mine, root=0)
    return _checked(Launch("mpi4py", rank, world_size, local_comm.Get_rank(), address, port), "COMM_WORLD")


def _from_mpi4py(env: Mapping[str, str]) -> Launch:
    try:
        from mpi4py import MPI  # type: ignore[import-not-found]
    except ImportError:
        raise LaunchError("SDM_LAUNCHER=mpi4py but mpi4py is not installed; install it (hpc_environment.yml lists "
                          "it) or let SDM_LAUNCHER default to auto") from None
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return launch_from_mpi(world, local, env)
    finally:
        local.Free()


_READERS: dict[str, Callable[[Mapping[str, str]], Launch]] = {
    "torchrun": _from_torchrun, "openmpi": _from_openmpi, "slurm": _from_slurm, "mpi4py": _from_mpi4py,
}
_DETECT = (("torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK")),
           ("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")),
           ("slurm", ("SLURM_STEP_NUM_TASKS",)))


def read_launch(env: Mapping[str, str]) -> Launch:
    """Which launcher started this process and where the process sits (see the module docstring).

    A pure function of `env` (except for SDM_LAUNCHER=mpi4py, which asks MPI). Raises LaunchError, one line,
    for a half-set or inconsistent environment (RANK without WORLD_SIZE, a rank not below the world size, ...).
    """
    choice = env.get("SDM_LAUNCHER", "auto").strip().lower() or "auto"
    if choice not in LAUNCHERS:
        raise LaunchError(f"SDM_LAUNCHER={env['SDM_LAUNCHER']!r} is not one of {', '.join(LAUNCHERS)}")
    if choice == "none":
        return SINGLE_PROCESS
    if choice != "auto":
        return _READERS[choice](env)
    for launcher, markers in _DETECT:
        if any(env.get(name, "").strip() for name in markers):
            return _READERS[launcher](env)
    if env.get("PMI_SIZE", "1").strip() not in ("", "0", "1"):
        raise LaunchError(f"started by an MPI launcher that is not Open MPI (PMI_SIZE={env['PMI_SIZE']}); set "
                          "SDM_LAUNCHER=mpi4py (with mpi4py installed), or launch with torchrun or srun")
    return SINGLE_PROCESS


# ----------------------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------------------


@contextmanager
def process_group(env: Mapping[str, str] | None = None) -> Iterator[Launch]:
    """Join the process group described by the launcher's environment for the duration of the block.

    A single process yields SINGLE_PROCESS and does nothing else. With CUDA, each process takes GPU
    `local_rank` as its current device, and CUDA tensors travel over NCCL, CPU tensors over gloo.
    """
    launch = read_launch(os.environ if env is None else env)
    if not launch.distributed:
        yield launch
        return
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    cuda = torch.cuda.is_available()
    if cuda and launch.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(launch.local_rank)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, init_method=launch.init_method, rank=launch.rank,
                                world_size=launch.world_size, timeout=timedelta(minutes=30))
    except dist.DistStoreError as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise LaunchError(f"rank {launch.rank} of {launch.world_size} ({launch.launcher}) could not meet rank 0 at "
                          f"{launch.init_method}: {first}; check MASTER_ADDR/MASTER_PORT") from None
    try:
        yield launch
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Helpers that read the current group (no-ops for one process)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes of the current group (0 of 1 without a group)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and summaries."""
        return self.rank == 0

    @property
    def bar_disabled(self) -> bool:
        """No progress bar on other ranks, nor where TQDM_DISABLE asks for none (`--no-progress`): an explicit
        `disable=` to tqdm overrides that variable, so the bars that pass one must read it themselves."""
        return not self.is_main or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items when `items` are dealt round-robin: rank r takes items r, r + size, ..."""
        return list(items[self.rank::self.size])


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def shard_bounds(count: int, world: World) -> tuple[int, int]:
    """Rows [start, stop) of a batch of `count` rows that `world.rank` takes: contiguous slices whose sizes
    differ by at most one (the first `count % size` ranks take one more). A rank gets an empty slice only when
    the batch has fewer rows than there are ranks."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (1 if world.rank < extra else 0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (the tensor itself with one process)."""
    if current_world().size == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` is true on at least one rank, so that every rank takes the same branch."""
    if current_world().size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def made_by_main(make: Callable[[], T]) -> T:
    """Rank 0 calls `make()` (e.g. creates the run folder) and every rank receives its result (picklable)."""
    world = current_world()
    if world.size == 1:
        return make()
    box = [make() if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(items: list[T]) -> list[T]:
    """Rank 0 receives every rank's `items` concatenated in rank order; other ranks get []. Ends with all
    ranks' items gathered, so it also marks the point where every rank has finished what came before."""
    world = current_world()
    if world.size == 1:
        return list(items)
    parts: list[list[T] | None] = [None] * world.size if world.is_main else []
    dist.gather_object(items, parts if world.is_main else None, dst=0)
    return [item for part in parts or [] for item in part] if world.is_main else []


def barrier() -> None:
    if current_world().size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# Stop signals (preemption, time limit)
# ----------------------------------------------------------------------------------------------------------


class StopSignals:
    """Within the block, SIGTERM and SIGUSR1 only record that a stop was asked for (`received` holds the
    signal's name) instead of killing the process, so a training loop can finish its step, save a checkpoint
    and exit; the job is then requeued and resumes from it.

    Slurm sends SIGTERM when it preempts or requeues a job (and SIGKILL after KillWait, 30 s by default);
    `sbatch --signal=USR1@120` sends SIGUSR1 two minutes before the time limit. Handlers can only be installed
    from the main thread; elsewhere the block does nothing. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in _STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def ignore_stop_signals() -> None:
    """Ignore SIGTERM and SIGUSR1 from now on. For a process that saved its checkpoint after a stop signal and is
    about to exit with REQUEUE_EXIT_STATUS: when another rank exits first, `srun --kill-on-bad-exit` sends the
    rest SIGTERM, which would otherwise turn that status into 'killed' and the job would not be requeued."""
    for name in _STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)

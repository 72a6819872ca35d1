"""Atomic checkpoints that carry their config.

Our checkpoint is one ``torch.save`` of a dict::

    {"config": {...}, "model": state_dict, "ema": state_dict, "optimizer": ..., "step": int, "epoch": int,
     "best_loss": float, "rng": rng_state()}

built from plain Python types and tensors only, so it loads with ``torch.load(weights_only=True)``.
A save goes to a temporary file beside the target (``.<name>.tmp-<pid>``), is fsynced and then moved onto the
target with ``os.replace``: a process killed at any moment leaves the old checkpoint or the new one, never a
half-written file under the real name. :func:`extract_state_dict` also reads the plain state dicts written by
OpenAI guided-diffusion, SDM and ISDM (``model*.pt``, ``ema_0.9999_*.pt``).
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .run_folder import RUN_LOCK, FileLock, atomic_write, hold_run

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DistributedDataParallel / DataParallel and by torch.compile."""

_MAX_REASON_CHARS = 200


# --------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (True when that cannot be told)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files left beside ``path`` by saves whose process has died."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)$")
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _process_alive(pid):
            entry.unlink(missing_ok=True)


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """Save ``payload`` to ``path`` atomically: temp file beside it, flush + fsync, then ``os.replace``.

    Temporary files left by earlier saves that were killed are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    with atomic_write(path, sync_folder=True) as handle:
        torch.save(payload, handle)


def _reason(error: BaseException) -> str:
    """A short one-line description of why torch.load failed."""
    text = str(error)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return f"holds a Python object of type {unsupported.group(1)}"
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unpickler:
        return f"not a PyTorch file: {unpickler.group(1).strip()[:_MAX_REASON_CHARS]}"
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first_line = re.sub(r"\x1b\[[0-9;]*m", "", first_line).split(". ")[0]
    if len(first_line) > _MAX_REASON_CHARS:
        first_line = first_line[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def load_checkpoint(path: Path | str, map_location: Any = "cpu", trusted: bool = True) -> dict[str, Any]:
    """Load a checkpoint dict (ours, or a plain state dict) from ``path``.

    The file is read with ``weights_only=True`` (tensors and plain containers only). A file that holds other
    Python objects is read again with ``weights_only=False`` only when ``trusted`` (the default, meant for our
    own run folders): unpickling such a file can run arbitrary code, so pass ``trusted=False`` for a file from
    elsewhere. Raises CheckpointError with one line when the file is missing or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: is not a readable checkpoint (the file is empty)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as safe_error:
        if "Unsupported global" not in str(safe_error):  # garbage, not a pickled Python object
            raise CheckpointError(f"checkpoint {path}: is not a readable checkpoint ({_reason(safe_error)})") from None
        if not trusted:
            raise CheckpointError(
                f"checkpoint {path}: is not a readable checkpoint ({_reason(safe_error)}; "
                "load it with trusted=True only if you trust its source)"
            ) from None
        try:
            payload = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as error:  # noqa: BLE001 - any failure here means the file is not a checkpoint
            raise CheckpointError(f"checkpoint {path}: is not a readable checkpoint ({_reason(error)})") from None
    except Exception as error:  # noqa: BLE001 - truncated zip, EOF, bad magic number, ...
        raise CheckpointError(f"checkpoint {path}: is not a readable checkpoint ({_reason(error)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {path}: is not a readable checkpoint (it holds a {type(payload).__name__}, not a dict)"
        )
    return payload


def read_weights_file(path: Path, error: type[Exception], missing: str, unreadable: str,
                      wrappers: tuple[str, ...] = ("state_dict",)) -> Any:
    """What a weights file holds, loaded on the CPU with ``weights_only``; a dict under one of ``wrappers`` is
    unwrapped, in their order. ``error(missing)`` when there is no such file, ``error(unreadable + " (<why>)")``
    when torch cannot read it (a corrupt or foreign file is a user mistake)."""
    if not path.is_file():
        raise error(missing)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as problem:
        raise error(f"{unreadable} ({type(problem).__name__})") from None
    for key in wrappers:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    return payload


# --------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------


def _strip_wrapper_prefixes(key: str) -> str:
    """Remove leading 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes from a parameter name."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def extract_state_dict(payload_or_state: Mapping[str, Any], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights held by a checkpoint, with 'module.' prefixes stripped.

    Accepts our payload ``{"config", "model", "ema", ...}`` (returns "ema" when present and ``prefer_ema``, else
    "model"), a ``{"state_dict": ...}`` wrapper, and the plain ``{name: tensor}`` dicts written by OpenAI
    guided-diffusion / SDM / ISDM (``model*.pt``, ``ema_0.9999_*.pt``). Raises CheckpointError when it holds none.
    """
    state: Any = payload_or_state
    if "model" in state and isinstance(state["model"], Mapping):
        ema = state.get("ema")
        state = ema if prefer_ema and isinstance(ema, Mapping) and ema else state["model"]
    elif "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not state or not_tensors:
        shown = ", ".join(repr(key) for key in (not_tensors or list(state))[:5])
        raise CheckpointError(
            "checkpoint holds neither model weights {name: tensor} nor a {'model': ..., 'ema': ...} payload"
            + (f" (non-tensor entries: {shown})" if shown else " (it is empty)")
        )
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _strip_wrapper_prefixes(key)
        if name in result:
            raise CheckpointError(f"checkpoint holds the parameter {name!r} twice (with and without 'module.')")
        result[name] = value
    return result


# --------------------------------------------------------------------------------------------------------------
# Random number generator states
# --------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The states of the torch, CUDA, Python and numpy global generators, in ``weights_only``-loadable form.

    Python's and numpy's Mersenne-Twister states are stored as int64 tensors plus plain numbers, so the whole
    dict holds only tensors, lists, ints, floats, strings and None.
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states saved by :func:`rng_state`; missing parts are left as they are.

    CUDA states are restored for as many devices as both the state and this machine have.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "python" in state:
        python = state["python"]
        internal = tuple(int(value) for value in python["internal"].tolist())
        random.setstate((int(python["version"]), internal, python["gauss_next"]))
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["bit_generator"],
                numpy_state["keys"].cpu().numpy().astype(np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for device, device_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(device_state.to("cpu", torch.uint8), device)


INPUT_CONV = "input_blocks.0.0.weight"
"""The UNet's first convolution (guided-diffusion's name): its input channels are the image channels."""


def image_channels_of(weights: Mapping[str, torch.Tensor]) -> int | None:
    """The image channels a UNet state dict takes (3 for every ISDM/SDM model), or None when it has no
    `input_blocks.0.0.weight` of 4 dimensions."""
    conv = weights.get(INPUT_CONV)
    return int(conv.shape[1]) if isinstance(conv, torch.Tensor) and conv.dim() == 4 else None


def load_weights(net: torch.nn.Module, weights: Mapping[str, torch.Tensor], path: Path | str, model_name: str) -> None:
    """Load `weights` into `net` strictly; a mismatch is one CheckpointError line naming the file and the first
    differing tensor (`model_name` says which model the config describes)."""
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()[:_MAX_REASON_CHARS]
        raise CheckpointError(f"checkpoint {path}: weights do not fit {model_name} (check num_classes, "
                              f"num_channels, channel_mult, attention_resolutions, image_channels): {detail}") from None


# --------------------------------------------------------------------------------------------------------------
# Finding checkpoints: a file, a run folder, or a folder of runs
# --------------------------------------------------------------------------------------------------------------

CHECKPOINT_FILES = {"best": ("best.pt", "latest.pt"), "latest": ("latest.pt", "best.pt")}
_RUN_NAME = re.compile(r"^([a-z]+)_(\d+)$")  # <action>_NNN: train_001, finetune_002, masks_001


def _run_checkpoint(run_dir: Path, prefer: str) -> Path | None:
    for name in CHECKPOINT_FILES[prefer]:
        candidate = run_dir / "checkpoints" / name
        if candidate.is_file():
            return candidate
    return None


def resolve_checkpoint(path: str | Path, key: str, prefer: str = "best",
                       actions: tuple[str, ...] = ("finetune", "train")) -> Path:
    """The checkpoint file meant by `path`, a config value named `key`.

    `path` may be a checkpoint file (ours or a plain SDM/ISDM state dict); a run folder (its
    checkpoints/best.pt, or latest.pt, as `prefer` says); or a folder of runs such as `Results/demo`, where the
    run of one of `actions` whose checkpoint was written last is taken.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{key} {str(path)!r}: no such file or folder")
    found = _run_checkpoint(path, prefer)
    if found:
        return found
    runs = [(child, _run_checkpoint(child, prefer)) for child in path.iterdir()
            if child.is_dir() and (m := _RUN_NAME.match(child.name)) and m.group(1) in actions]
    runs = [(run, file) for run, file in runs if file is not None]
    if not runs:
        raise CheckpointError(f"{key} {str(path)!r}: no checkpoint there (expected a .pt file, a run folder with "
                              f"checkpoints/, or a folder of {' or '.join(actions)} runs)")
    return max(runs, key=lambda item: item[1].stat().st_mtime)[1]


def find_resumable(root: str | Path, action: str, log=print) -> tuple[Path, FileLock] | None:
    """For auto_resume: the newest `latest.pt` of an earlier `action` run under `root` that no other process runs
    or continues, if any, with that run's folder held (`hold_run`) for the caller to keep while its own run
    continues it. So a requeued job resumes its own run, not the run of a job of the same config still training
    beside it, and of two jobs started together beside one stopped run, only one continues it (the other looks
    on to older runs, then starts afresh)."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [child / "checkpoints" / "latest.pt" for child in root.iterdir()
                  if child.is_dir() and child.name.startswith(f"{action}_")]
    candidates = [c for c in candidates if c.is_file()]
    for checkpoint in sorted(candidates, key=lambda c: (c.stat().st_mtime, str(c)), reverse=True):
        lock = hold_run(checkpoint.parent.parent)
        if lock is not None:
            return checkpoint, lock
        log(f"auto_resume: not resuming from {checkpoint}: another process is still running that run or "
            f"continuing it (it holds {checkpoint.parent.parent / RUN_LOCK})")
    return None

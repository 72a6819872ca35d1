"""Tests for guided_diffusion/checkpoint.py: atomic saves, loading errors, state-dict extraction, RNG states."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from guided_diffusion.checkpoint import (
    extract_state_dict,
    find_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from guided_diffusion.errors import CheckpointError
from guided_diffusion.run_folder import hold_run, run_is_held

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 1))


def _payload() -> dict:
    model = _tiny_model(0)
    ema = _tiny_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    return {
        "config": {"diffusion_steps": 1000, "s": 1.5, "drop_rate": 0.2, "attention_resolutions": [32, 16]},
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 1234,
        "epoch": 7,
        "best_loss": 0.125,
        "rng": rng_state(),
    }


def _assert_equal(actual, expected) -> None:
    """Deep equality for nested dicts / lists / tensors."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected:
            _assert_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_equal(a, e)
    else:
        assert actual == expected


# ---------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------


def test_round_trip_returns_equal_payload(tmp_path: Path) -> None:
    payload = _payload()
    path = tmp_path / "latest.pt"
    save_checkpoint(path, payload)
    _assert_equal(load_checkpoint(path), payload)


def test_our_payload_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, _payload())
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["step"] == 1234


def test_save_overwrites_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "train_001" / "latest.pt"  # parent folders are created
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_is_ignored_by_load_and_removed_by_next_save(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 1})
    stale = tmp_path / f".latest.pt.tmp-{_dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".latest.pt.tmp-{os.getppid()}"  # a running process may still be writing this one
    live.write_bytes(b"in progress")
    assert load_checkpoint(path)["step"] == 1
    save_checkpoint(path, {"step": 2})
    assert not stale.exists()
    assert live.exists()
    assert load_checkpoint(path)["step"] == 2


_SAVER = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
from guided_diffusion.checkpoint import save_checkpoint

path, count = sys.argv[1], int(sys.argv[3])
weights = [torch.arange(count, dtype=torch.int32) + 7 * parity for parity in (0, 1)]
step = int(sys.argv[4])
while True:
    step += 1
    save_checkpoint(path, {"step": step, "weights": weights[step % 2], "config": {"step": step}})
    print(step, flush=True)
"""


def test_killed_saves_leave_a_loadable_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process that saves ~100 MB checkpoints in a loop; the file must always load whole."""
    count = 25_000_000  # int32: 100 MB
    expected = [torch.arange(count, dtype=torch.int32) + 7 * parity for parity in (0, 1)]
    path = tmp_path / "latest.pt"
    rng = random.Random()
    last_step = 0
    killed_mid_save = 0
    stale_temps: list[Path] = []
    for _ in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), str(REPO_ROOT), str(count), str(last_step)],
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not lines and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines, f"the saving process never finished a save (exit status {process.poll()})"
        # The stale temp file of the previous killed save is removed by this process's first save.
        assert all(not stale.exists() or stale.name.endswith(f"-{process.pid}") for stale in stale_temps)
        time.sleep(rng.uniform(0.0, 0.8))
        process.send_signal(signal.SIGKILL)
        process.wait()
        reader.join(timeout=10)
        last_printed = int(lines[-1])
        stale_temps = list(tmp_path.glob(".latest.pt.tmp-*"))
        killed_mid_save += bool(stale_temps)

        loaded = load_checkpoint(path)
        # Killed before or after the os.replace of the save in flight: the previous or the new checkpoint.
        assert loaded["step"] in (last_printed, last_printed + 1)
        assert loaded["config"] == {"step": loaded["step"]}
        assert torch.equal(loaded["weights"], expected[loaded["step"] % 2])
        last_step = loaded["step"]
    assert killed_mid_save >= 1, "no kill landed inside a save; the test did not exercise the interesting case"


# ---------------------------------------------------------------------------------------------------------------
# load errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path}: file not found"


def test_garbage_file_is_not_readable(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00\xffthis is not a checkpoint" * 100)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: is not a readable checkpoint (")
    assert "\n" not in message


def test_truncated_file_is_not_readable(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    save_checkpoint(whole, _payload())
    path = tmp_path / "cut.pt"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"checkpoint {path}: is not a readable checkpoint (")
    assert "\n" not in str(info.value)


def test_empty_file_is_not_readable(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(CheckpointError, match=r"is not a readable checkpoint \(the file is empty\)"):
        load_checkpoint(path)


def test_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_non_dict_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=r"it holds a list, not a dict"):
        load_checkpoint(path)


def test_python_objects_need_trust(tmp_path: Path) -> None:
    path = tmp_path / "with_path.pt"
    torch.save({"config": {"data_dir": Path("/data")}}, path)
    assert load_checkpoint(path)["config"]["data_dir"] == Path("/data")
    with pytest.raises(CheckpointError, match=r"holds a Python object of type pathlib\.\w*Path"):
        load_checkpoint(path, trusted=False)


# ---------------------------------------------------------------------------------------------------------------
# extract_state_dict
# ---------------------------------------------------------------------------------------------------------------


def test_extract_prefers_ema() -> None:
    payload = _payload()
    _assert_equal(extract_state_dict(payload), payload["ema"])
    _assert_equal(extract_state_dict(payload, prefer_ema=False), payload["model"])


def test_extract_falls_back_to_model_without_ema() -> None:
    payload = _payload()
    payload["ema"] = None
    _assert_equal(extract_state_dict(payload), payload["model"])
    del payload["ema"]
    _assert_equal(extract_state_dict(payload), payload["model"])


@pytest.mark.parametrize("prefix", ["", "module."])
def test_extract_plain_state_dict_file(tmp_path: Path, prefix: str) -> None:
    """An ISDM/SDM/guided-diffusion file (`ema_0.9999_*.pt`) is a plain {name: tensor} dict, maybe from DDP."""
    source = _tiny_model(3)
    path = tmp_path / "ema_0.9999_010000.pt"
    torch.save({prefix + name: tensor for name, tensor in source.state_dict().items()}, path)
    state = extract_state_dict(load_checkpoint(path))
    assert not any(name.startswith("module.") for name in state)
    target = _tiny_model(4)
    target.load_state_dict(state, strict=True)
    _assert_equal(target.state_dict(), source.state_dict())


def test_extract_strips_module_prefix_inside_payload() -> None:
    model = _tiny_model(5).state_dict()
    payload = {"config": {}, "model": {"module." + k: v for k, v in model.items()}}
    _assert_equal(extract_state_dict(payload), dict(model))


def test_extract_rejects_dict_without_weights() -> None:
    with pytest.raises(CheckpointError, match="neither model weights"):
        extract_state_dict({"config": {"s": 1.0}, "step": 3})


# ---------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------


def _draw() -> tuple:
    return torch.rand(4).tolist(), random.random(), random.gauss(0, 1), np.random.rand(3).tolist()


def test_rng_state_restores_all_generators(tmp_path: Path) -> None:
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": rng_state()})
    first = _draw()
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert _draw() == first


def _stopped_runs(root: Path, numbers=(1, 2, 3)) -> None:
    """Runs train_001.. whose latest.pt were written in that order, none of them held."""
    for number in numbers:
        latest = root / f"train_{number:03d}" / "checkpoints" / "latest.pt"
        latest.parent.mkdir(parents=True)
        save_checkpoint(latest, {"step": number})
        os.utime(latest, (number * 1_000, number * 1_000))


def test_auto_resume_takes_the_newest_latest_pt_of_a_run_no_other_process_is_running(tmp_path: Path) -> None:
    """A requeued Slurm job resumes its own stopped run, not the newer checkpoint of a job of the same config that
    is still training beside it (that job holds its run folder)."""
    _stopped_runs(tmp_path)
    checkpoint, lock = find_resumable(tmp_path, "train", log=lambda *_: None)
    assert checkpoint == tmp_path / "train_003/checkpoints/latest.pt"
    lock.release()
    log = []
    with hold_run(tmp_path / "train_003"):
        checkpoint, lock = find_resumable(tmp_path, "train", log=log.append)
        assert checkpoint == tmp_path / "train_002/checkpoints/latest.pt"
        lock.release()
    assert log == [f"auto_resume: not resuming from {tmp_path / 'train_003/checkpoints/latest.pt'}: another "
                   f"process is still running that run or continuing it (it holds {tmp_path / 'train_003/run.lock'})"]
    assert find_resumable(tmp_path, "finetune", log=log.append) is None


def test_of_two_jobs_started_beside_one_stopped_run_only_one_continues_it(tmp_path: Path) -> None:
    """Two Slurm jobs of one config started together (a requeued one beside a fresh submission) both look before
    either has written a checkpoint: the first holds the stopped run it continues, so the second looks on to an
    older run, then finds none and starts afresh."""
    _stopped_runs(tmp_path, numbers=(1, 2))
    quiet = lambda *_: None  # noqa: E731
    first_checkpoint, first = find_resumable(tmp_path, "train", log=quiet)
    second_checkpoint, second = find_resumable(tmp_path, "train", log=quiet)
    assert (first_checkpoint.parent.parent.name, second_checkpoint.parent.parent.name) == ("train_002", "train_001")
    assert run_is_held(tmp_path / "train_002") and run_is_held(tmp_path / "train_001")
    assert find_resumable(tmp_path, "train", log=quiet) is None
    first.release()
    second.release()
    checkpoint, lock = find_resumable(tmp_path, "train", log=quiet)  # once they end, the newest is free again
    assert checkpoint.parent.parent.name == "train_002"
    lock.release()

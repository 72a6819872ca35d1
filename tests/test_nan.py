"""A run whose loss turns NaN stops at once with one line and status 2, and never saves non-finite weights."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import main
from conftest import tiny_train_config, write_config
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.config import config_from_dict
from guided_diffusion.distributed import process_group
from guided_diffusion.train import Trainer, TrainingDiverged

# 12 demo images, val_fraction 0.2 -> 10 training images, batches of 4 -> 3 steps per epoch.


def make_trainer(demo_dir: Path, root: Path, **changes) -> Trainer:
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, root, **changes))
    return Trainer(config, "train", log=lambda *_: None)


def nan_from_step(trainer: Trainer, first: int) -> None:
    """Make the model's output NaN from step `first` on (as an lr far too high does, but at a chosen step)."""
    model = trainer.forward

    def forward(x, t, labels):
        out = model(x, t, labels)
        return out * float("nan") if trainer.state.step + 1 >= first else out

    trainer.forward = forward


def all_finite(path: Path) -> bool:
    payload = load_checkpoint(path)
    return all(torch.isfinite(tensor).all() for part in ("model", "ema") for tensor in payload[part].values())


def test_an_lr_far_too_high_ends_the_run_with_one_line_and_status_2(demo_dir, tmp_path, capsys):
    root = tmp_path / "Results"
    config = write_config(tmp_path / "train.json", tiny_train_config(demo_dir, root, lr=1e10, save_interval=1))
    assert main.main(["train", "-c", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert errors[0].startswith("error: loss is NaN at step ")
    assert errors[0].endswith(" (lr 1e+10); no best.pt was written")
    checkpoints = root / "train_001" / "checkpoints"
    assert not (checkpoints / "best.pt").exists()
    assert all_finite(checkpoints / "latest.pt")  # saved by an earlier step, before the NaN


def test_best_pt_keeps_the_last_finite_epoch_and_the_error_says_so(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path, max_epochs=5, save_interval=1)
    nan_from_step(trainer, 5)
    with pytest.raises(TrainingDiverged) as raised:
        trainer.run()
    assert str(raised.value) == "loss is NaN at step 5 (lr 0.001); best.pt still holds epoch 0"
    best = load_checkpoint(trainer.checkpoint_dir / "best.pt")
    assert best["train_state"]["best_epoch"] == 0 and all_finite(trainer.checkpoint_dir / "best.pt")
    latest = load_checkpoint(trainer.checkpoint_dir / "latest.pt")
    assert latest["train_state"]["step"] == 4 and all_finite(trainer.checkpoint_dir / "latest.pt")


def test_the_summary_says_the_run_diverged(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path, max_epochs=5)
    nan_from_step(trainer, 5)
    with pytest.raises(TrainingDiverged):
        trainer.run()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["diverged"] is True
    assert summary["stop_reason"] == "diverged: loss is NaN at step 5 (lr 0.001); best.pt still holds epoch 0"


def test_the_first_nan_step_is_named_even_when_that_step_was_not_logged(demo_dir, tmp_path):
    # Nothing is logged or saved before the epoch ends (step 3): the NaN of step 2 is found there.
    trainer = make_trainer(demo_dir, tmp_path, max_epochs=1, log_interval=100, save_interval=100)
    nan_from_step(trainer, 2)
    with pytest.raises(TrainingDiverged, match=r"^loss is NaN at step 2 \(lr 0.001\); no best.pt was written$"):
        trainer.run()
    assert not (trainer.checkpoint_dir / "best.pt").exists()
    assert not (trainer.checkpoint_dir / "latest.pt").exists()


def test_weights_made_non_finite_by_an_update_are_never_saved(demo_dir, tmp_path):
    # The losses stay finite; the optimiser's second step writes a NaN into one weight (as an inf gradient would).
    trainer = make_trainer(demo_dir, tmp_path, max_epochs=1, save_interval=1)
    step = trainer.optimizer.step

    def poisoned_step():
        step()
        if trainer.state.step == 1:  # state.step counts the steps before this one
            next(trainer.model.parameters()).data.view(-1)[0] = float("nan")

    trainer.optimizer.step = poisoned_step
    with pytest.raises(TrainingDiverged, match=r"^the weights are not finite after step 2 \(lr 0.001\); no best"):
        trainer.run()
    latest = load_checkpoint(trainer.checkpoint_dir / "latest.pt")
    assert latest["train_state"]["step"] == 1 and all_finite(trainer.checkpoint_dir / "latest.pt")


def test_a_finite_run_reports_no_divergence(demo_dir, tmp_path):
    result = make_trainer(demo_dir, tmp_path, max_steps=2).run()
    assert json.loads((result.run_dir / "summary.json").read_text())["diverged"] is False


def _spawned(rank: int, port: int, demo_dir: Path, root: Path) -> None:
    """One of two gloo ranks; only rank 1's loss turns NaN in step 2, rank 0's in step 3 (through the averaged
    gradient); nothing is logged or saved before the end of epoch 0 (step 3), where both find it."""
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    with process_group(env):
        trainer = make_trainer(demo_dir, root / "train", batch_size=2, log_interval=100, save_interval=100)
        if rank == 1:
            nan_from_step(trainer, 2)
        try:
            trainer.run()
            message = "no error"
        except TrainingDiverged as error:
            message = str(error)
        (root / f"rank{rank}.txt").write_text(message)


def test_with_two_processes_every_rank_stops_at_the_first_nan_of_any_rank(demo_dir, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_spawned, args=(port, demo_dir, tmp_path), nprocs=2, join=True)
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert messages == ["loss is NaN at step 2 (lr 0.001); no best.pt was written"] * 2
    [run_dir] = (tmp_path / "train").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["diverged"] is True
    assert not (run_dir / "checkpoints" / "best.pt").exists()

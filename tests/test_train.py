"""The training loop: best-epoch checkpointing, exact resume, null-label finetuning, what checkpoints carry."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_train_config
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.config import config_from_dict
from guided_diffusion.errors import CheckpointError, ConfigError
from guided_diffusion.run_folder import run_is_held
from guided_diffusion import distributed
from guided_diffusion import train as train_module
from guided_diffusion.train import Trainer, train_action


def make_trainer(demo_dir: Path, root: Path, action: str = "train", **changes) -> Trainer:
    config, _ = config_from_dict(action, tiny_train_config(demo_dir, root, **changes))
    return Trainer(config, action, log=lambda *_: None)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}}


def test_a_run_holds_its_folder_while_it_trains_and_lets_go_when_it_ends(demo_dir, tmp_path, monkeypatch):
    """So that auto_resume in another job of the same config does not train on from this run's latest.pt."""
    trainer = make_trainer(demo_dir, tmp_path, max_steps=2)
    real, seen = Trainer._train_and_save, []

    def watched(self, *args):
        seen.append(run_is_held(self.run_dir))
        return real(self, *args)

    monkeypatch.setattr(Trainer, "_train_and_save", watched)
    trainer.run()
    assert seen == [True] and not run_is_held(trainer.run_dir)


def test_a_run_auto_resume_continues_holds_the_stopped_run_too_until_it_ends(demo_dir, tmp_path, monkeypatch):
    """So that a second job of the same config, started beside this one, does not continue that run as well."""
    make_trainer(demo_dir, tmp_path, max_steps=1, save_interval=1).run()
    stopped = tmp_path / "train_001"
    assert (stopped / "checkpoints" / "latest.pt").is_file() and not run_is_held(stopped)
    real, seen = Trainer._train_and_save, []

    def watched(self, *args):
        seen.append((self.run_dir.name, run_is_held(stopped), run_is_held(self.run_dir)))
        return real(self, *args)

    monkeypatch.setattr(Trainer, "_train_and_save", watched)
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, tmp_path, max_steps=2, save_interval=1,
                                                            auto_resume=True))
    result = train_module.run_training(config, "train", log=lambda *_: None)
    assert seen == [("train_002", True, True)] and result.state.step == 2
    assert not run_is_held(stopped) and not run_is_held(tmp_path / "train_002")


def test_resume_continues_exactly(demo_dir, tmp_path):
    # 12 demo images, val_fraction 0.2 -> 10 training images, batches of 4 -> 3 steps per epoch.
    straight = make_trainer(demo_dir, tmp_path / "a", max_steps=5, save_interval=2)
    straight.run()

    first = make_trainer(demo_dir, tmp_path / "b", max_steps=2, save_interval=2)
    first.run()
    resumed = make_trainer(demo_dir, tmp_path / "b", max_steps=5, save_interval=2)
    message = resumed.start_from(first.checkpoint_dir / "latest.pt")
    assert message.startswith("resuming exactly") and "step 2" in message
    resumed.run()

    assert resumed.state.step == straight.state.step == 5
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.state.best_loss == straight.state.best_loss
    best_straight = load_checkpoint(straight.checkpoint_dir / "best.pt")
    best_resumed = load_checkpoint(resumed.checkpoint_dir / "best.pt")
    assert best_straight["train_state"]["best_epoch"] == best_resumed["train_state"]["best_epoch"]
    for name, tensor in best_straight["ema"].items():
        assert torch.equal(tensor, best_resumed["ema"][name]), name


def test_loading_the_first_epoch_ahead_on_threads_changes_no_weight(demo_dir, tmp_path):
    in_step = make_trainer(demo_dir, tmp_path / "a", max_steps=4, data_threads=0)
    in_step.run()
    ahead = make_trainer(demo_dir, tmp_path / "b", max_steps=4, data_threads=2)
    ahead.run()
    assert all(entry is not None for entry in ahead.dataset._cached)  # 4 steps of 4 cover the 10 images
    assert ahead.dataset._pool is None  # the threads are gone when training ends
    a, b = weights(in_step), weights(ahead)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_negative_data_threads_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict("train", {"data_dir": "datasets/demo", "num_classes": 4, "data_threads": -1}, "configs/x.json")
    assert str(info.value) == "configs/x.json: key 'data_threads' must be >= 0 (0 = load in the step), got -1"


def test_with_isdms_rule_best_checkpoint_holds_the_epoch_with_the_lowest_mean_loss(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path, max_epochs=3, best_by="epoch_loss")
    result = trainer.run()
    epochs = read_csv(result.run_dir / "epochs.csv")
    assert [int(e["epoch"]) for e in epochs] == [0, 1, 2]
    losses = [float(e["loss"]) for e in epochs]
    best = load_checkpoint(result.best_checkpoint)
    assert best["train_state"]["best_epoch"] == losses.index(min(losses))
    assert best["train_state"]["best_loss"] == pytest.approx(min(losses))
    assert [int(e["is_best"]) for e in epochs][0] == 1


def test_epoch_loss_is_the_mean_of_the_losses_already_computed(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path, max_epochs=1, log_interval=1)
    calls = []
    model = trainer.forward
    trainer.forward = lambda *args: calls.append(args[0].shape[0]) or model(*args)
    result = trainer.run()
    steps = read_csv(result.run_dir / "log.csv")
    assert len(calls) == len(steps) == 3  # one forward per step, none extra for logging
    sizes = [4, 4, 2]
    mean = sum(float(s["loss"]) * n for s, n in zip(steps, sizes)) / sum(sizes)
    assert float(read_csv(result.run_dir / "epochs.csv")[0]["loss"]) == pytest.approx(mean, rel=1e-5)


def test_checkpoints_carry_config_weights_optimizer_progress_and_rng(demo_dir, tmp_path):
    result = make_trainer(demo_dir, tmp_path, max_steps=2).run()
    latest = load_checkpoint(result.latest_checkpoint)
    assert {"config", "model", "ema", "optimizer", "train_state", "generator", "rng"} <= latest.keys()
    assert latest["config"]["num_classes"] == 4 and latest["action"] == "train"
    assert latest["train_state"]["step"] == 2
    assert "optimizer" not in load_checkpoint(result.best_checkpoint)


def test_patience_stops_training_without_improvement(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path, max_epochs=50, patience=1, lr=1e-9, ema_warmup=False)
    result = trainer.run()
    assert result.stop_reason == "no improvement for 1 epochs" or result.state.epoch < 50
    assert result.state.epoch < 50


def test_with_ema_warmup_an_ema_rate_the_run_never_reaches_changes_nothing_and_the_log_says_so(demo_dir, tmp_path):
    # The warm-up caps the EMA rate at (1+step)/(10+step): 0.1, 0.18, 0.25, 0.31, 0.36 over 5 steps.
    def run(rate: float, folder: str) -> tuple[Trainer, list[str]]:
        lines: list[str] = []
        config, _ = config_from_dict("train", tiny_train_config(demo_dir, tmp_path / folder, max_steps=5,
                                                                ema_rate=rate))
        trainer = Trainer(config, "train", log=lines.append)
        trainer.run()
        return trainer, lines

    (high, _), (higher, higher_log), (low, low_log) = run(0.9, "a"), run(0.9999, "b"), run(0.2, "c")
    for name, tensor in high.ema.state_dict().items():
        assert torch.equal(tensor, higher.ema.state_dict()[name]), name
    assert not all(torch.equal(t, low.ema.state_dict()[n]) for n, t in high.ema.state_dict().items())
    note = [line for line in higher_log if line.startswith("note: ema_rate")]
    assert note == ["note: ema_rate 0.9999 is never used in this run: with ema_warmup the EMA rate is "
                    "min(ema_rate, (1+step)/(10+step)), which reaches 0.9999 only at step 89,990; this run ends by "
                    "step 5 (EMA rate 0.3571 there), so any ema_rate above that gives the same weights"]
    assert not [line for line in low_log if line.startswith("note: ema_rate")]  # 0.2 is reached at step 2
    assert train_module.ema_warmup_reaches(0.999) == 8990 and train_module.ema_warmup_reaches(0.2) == 2


def test_finetune_replaces_masks_by_the_null_label_with_drop_rate(demo_dir, tmp_path):
    trained = make_trainer(demo_dir, tmp_path, max_steps=1).run()
    finetune = make_trainer(demo_dir, tmp_path, "finetune", resume_checkpoint=str(trained.best_checkpoint),
                            drop_rate=0.5, max_epochs=4)
    assert finetune.start_from(trained.best_checkpoint).startswith("initialised weights")
    assert finetune.state.step == 0
    seen = []
    model = finetune.forward
    finetune.forward = lambda x, t, y: seen.extend(y.flatten(1).sum(1).tolist()) or model(x, t, y)
    finetune.run()
    null = sum(1 for total in seen if total == 0)
    assert 0.25 < null / len(seen) < 0.75  # 40 samples, each dropped with probability 0.5
    assert all(total in (0, 32 * 32) for total in seen)  # a kept one-hot has one class per pixel


def test_a_checkpoint_of_another_model_shape_is_a_clear_error(demo_dir, tmp_path):
    trained = make_trainer(demo_dir, tmp_path, max_steps=1).run()
    wider = make_trainer(demo_dir, tmp_path, num_channels=64, max_steps=1)
    with pytest.raises(CheckpointError, match="weights do not fit the config's model"):
        wider.start_from(trained.best_checkpoint)


def test_train_action_exits_0_when_the_run_ends(demo_dir, tmp_path):
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, tmp_path, max_steps=1))
    assert train_action(config, "train", log=lambda *_: None) is None


def test_train_action_asks_sbatch_to_requeue_when_a_stop_signal_ended_the_run(monkeypatch):
    ignored = []
    monkeypatch.setattr(train_module, "run_training", lambda *_: SimpleNamespace(stop_signal="SIGUSR1"))
    monkeypatch.setattr(distributed, "ignore_stop_signals", lambda: ignored.append(True))
    assert train_action(None, "train") == distributed.REQUEUE_EXIT_STATUS == 75
    assert ignored  # the exit itself must not be cut short by a second signal

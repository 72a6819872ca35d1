"""How training picks best.pt: the EMA weights' loss on one fixed batch (best_by "fixed_batch", the default), or
ISDM's lowest epoch loss (best_by "epoch_loss")."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_config
from guided_diffusion import train as train_module
from guided_diffusion.best_epoch import FIXED_ROWS, check_interval, fixed_batch_loss, make_fixed_batch
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.config import config_from_dict
from guided_diffusion.errors import ConfigError
from guided_diffusion.train import Trainer


def make_trainer(demo_dir: Path, root: Path, **changes) -> Trainer:
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, root, **changes))
    return Trainer(config, "train", log=lambda *_: None)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_checks_are_spaced_to_cost_about_five_percent_of_training():
    # 32 forward rows ~ 32/3 training rows; 5 % of the rows trained between two checks
    assert check_interval(8) == 27
    assert check_interval(4) == 54
    assert check_interval(72) == 3 and check_interval(214) == 1
    assert check_interval(8) * 8 * 3 * 0.05 >= FIXED_ROWS


def test_the_fixed_batch_spreads_its_timesteps_and_is_the_same_every_time(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path)
    make = lambda: make_fixed_batch(trainer.dataset.__getitem__, len(trainer.dataset), 1000, 4, None, seed=3,
                                    crop_size=16, drop_rate=0.25)
    first, second = make(), make()
    for name in ("images", "labels", "t", "noise"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.images.shape == (FIXED_ROWS, 3, 16, 16) and first.noise.shape == first.images.shape
    assert sorted(first.t.tolist()) == [int((i + 0.5) * 1000 / FIXED_ROWS) for i in range(FIXED_ROWS)]
    dropped = (first.labels.flatten(1).sum(1) == 0).sum().item()
    assert 0 < dropped < FIXED_ROWS  # drop_rate 0.25: some rows hold the null label, as in finetuning
    other = make_fixed_batch(trainer.dataset.__getitem__, len(trainer.dataset), 1000, 4, None, seed=4, crop_size=16)
    assert not torch.equal(first.noise, other.noise)


def test_the_fixed_loss_is_the_same_for_the_same_weights_and_moves_with_them(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path)
    batch = make_fixed_batch(trainer.dataset.__getitem__, len(trainer.dataset), trainer.diffusion.num_timesteps, 4,
                             None, seed=0)
    loss = lambda: fixed_batch_loss(trainer.diffusion, trainer.ema, batch, trainer.device, False)
    before = loss()
    assert before == loss() and math.isfinite(before)
    whole = fixed_batch_loss(trainer.diffusion, trainer.ema, batch, trainer.device, False, chunk=5)
    assert whole == pytest.approx(before, rel=1e-5)  # microbatches compute the same mean
    with torch.no_grad():
        for parameter in trainer.ema.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert loss() != before


def test_checking_the_fixed_batch_trains_the_same_weights(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "check_interval", lambda _batch: 1)  # a check at every epoch's end
    fixed = make_trainer(demo_dir, tmp_path / "a", max_epochs=3, best_by="fixed_batch")
    fixed.run()
    isdm = make_trainer(demo_dir, tmp_path / "b", max_epochs=3, best_by="epoch_loss")
    isdm.run()
    for name, tensor in fixed.ema.state_dict().items():
        assert torch.equal(tensor, isdm.ema.state_dict()[name]), name


def test_best_checkpoint_holds_the_checked_epoch_with_the_lowest_fixed_loss(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "check_interval", lambda _batch: 6)  # 3 steps an epoch: every other epoch
    result = make_trainer(demo_dir, tmp_path, max_epochs=5).run()
    epochs = read_csv(result.run_dir / "epochs.csv")
    checked = {int(e["epoch"]): float(e["fixed_loss"]) for e in epochs if e["fixed_loss"]}
    assert sorted(checked) == [0, 2, 4]
    best = load_checkpoint(result.best_checkpoint)["train_state"]
    assert best["best_epoch"] == min(checked, key=checked.get)
    assert best["best_loss"] == pytest.approx(min(checked.values()))
    assert best["best_by"] == "fixed_batch"
    assert all(int(e["is_best"]) == 0 for e in epochs if not e["fixed_loss"])  # an unchecked epoch never wins


def test_resuming_a_run_that_chose_by_the_epoch_loss_starts_the_choice_anew(demo_dir, tmp_path):
    first = make_trainer(demo_dir, tmp_path / "a", max_steps=3, best_by="epoch_loss")
    first.run()
    notes = []
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, tmp_path / "a", max_steps=6))
    resumed = Trainer(config, "train", log=notes.append)
    resumed.start_from(first.checkpoint_dir / "latest.pt")
    assert resumed.state.best_loss == math.inf and resumed.state.best_by == "fixed_batch"
    assert any("chose its best epoch by epoch_loss" in note for note in notes)
    resumed.run()
    assert load_checkpoint(resumed.checkpoint_dir / "best.pt")["train_state"]["best_epoch"] == 1


def test_a_bad_best_by_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict("train", {"data_dir": "datasets/demo", "num_classes": 4, "best_by": "val_loss"},
                         "configs/x.json")
    message = str(info.value)
    assert message.startswith("configs/x.json: key 'best_by'") and "fixed_batch" in message
    assert "\n" not in message

"""Watching training (watch.py): TensorBoard events, previews of fixed held-out masks, loss.png, their config keys."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_train_config
from guided_diffusion import watch
from guided_diffusion.config import config_from_dict
from guided_diffusion.distributed import World
from guided_diffusion.errors import ConfigError
from guided_diffusion.model_setup import build_model
from guided_diffusion.run_folder import colorize
from guided_diffusion.train import Trainer, build_diffusion


def make_trainer(demo_dir: Path, root: Path, action: str = "train", log=lambda *_: None, **changes) -> Trainer:
    config, _ = config_from_dict(action, tiny_train_config(demo_dir, root, **changes))
    return Trainer(config, action, log=log)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of a run folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# --------------------------------------------------------------------------------------------------------------
# the keys


@pytest.mark.parametrize("value, shown", [(-1, "-1"), (2.5, "2.5"), ("often", '"often"'), (True, "true"),
                                          (None, "null")])
def test_a_preview_interval_not_a_step_count_nor_auto_is_one_line_naming_the_key(value, shown):
    with pytest.raises(ConfigError) as info:
        config_from_dict("train", {"data_dir": "d", "num_classes": 4, "preview_interval": value}, "configs/x.json")
    assert str(info.value) == (f"configs/x.json: key 'preview_interval' must be a number of steps (0 = off) or "
                               f"\"auto\", got {shown}")


@pytest.mark.parametrize("value, shown", [("yes", '"yes"'), (1, "1"), (None, "null")])
def test_a_tensorboard_not_true_or_false_is_one_line_naming_the_key(value, shown):
    with pytest.raises(ConfigError) as info:
        config_from_dict("finetune", {"data_dir": "d", "num_classes": 4, "resume_checkpoint": "r",
                                      "tensorboard": value}, "configs/x.json")
    assert str(info.value) == f"configs/x.json: key 'tensorboard' must be true/false, got {shown}"


def test_the_keys_default_to_tensorboard_on_and_auto_previews_and_the_mask_generator_makes_none():
    train, _ = config_from_dict("train", {"data_dir": "d", "num_classes": 4})
    assert (train.tensorboard, train.preview_interval) == (True, "auto")
    masks, _ = config_from_dict("masks", {"data_dir": "d", "num_classes": 4})
    assert masks.preview_interval == 0
    with pytest.raises(ConfigError) as info:
        config_from_dict("masks", {"data_dir": "d", "num_classes": 4, "preview_interval": 100}, "m.json")
    assert str(info.value) == ("m.json: key 'preview_interval' must be 0: the mask generator makes no previews "
                               "(got 100); leave it out")


# --------------------------------------------------------------------------------------------------------------
# the schedule


def test_auto_makes_about_ten_previews_but_never_more_often_than_two_percent_of_the_training_allows():
    assert watch.auto_interval(100_000, 8, 1.0) == 10_000  # a long run: 10 previews
    assert watch.auto_interval(1_000, 8, 1.0) == 834  # a short one: 50 forwards of <= a batch ~ 17 steps, / 2 %
    assert watch.auto_interval(1_000, 8, 1.5) == 1_667  # guidance: two forwards per step
    assert watch.auto_interval(1_000, 1, 1.0) == 3_334  # 4 images at batch 1: 4 batches per forward
    for batch, guidance in ((1, 1.0), (4, 1.0), (16, 1.5)):
        interval = watch.auto_interval(10, batch, guidance)
        assert watch.preview_cost_in_steps(batch, guidance) / interval <= watch.MAX_PREVIEW_SHARE


def test_previews_come_every_preview_interval_steps(demo_dir, tmp_path):
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, tmp_path, preview_interval=3))
    made = []
    watched = watch.open_watch(config, tmp_path, 10, True, lambda *_: None, lambda: made.append(1) or "inputs")
    assert [step for step in range(1, 11) if watched.preview_due(step)] == [3, 6, 9] and made == [1]
    watched.close()


def test_a_run_too_short_for_its_auto_interval_makes_no_preview_and_says_so(demo_dir, tmp_path):
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, tmp_path, tensorboard=False))
    lines = []
    watched = watch.open_watch(config, tmp_path, 60, True, lines.append, lambda: pytest.fail("masks loaded"))
    assert not any(watched.preview_due(step) for step in range(1, 61))
    assert lines == ["no previews in this run: preview_interval auto is 834 steps, more than its 60 planned steps; "
                     "set a smaller preview_interval to see some"]


def test_ranks_other_than_0_write_nothing_and_load_no_preview(demo_dir, tmp_path):
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, tmp_path / "root", preview_interval=1))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = []
    other = World(rank=1, size=2)
    watched = watch.open_watch(config, run_dir, 10, other.is_main, lines.append, lambda: pytest.fail("loaded"))
    watched.scalars(1, {"loss": 1.0})
    assert not watched.preview_due(1)
    watched.close()
    assert list(run_dir.iterdir()) == [] and lines == []


# --------------------------------------------------------------------------------------------------------------
# the preview itself


@pytest.fixture(scope="module")
def preview_setup(demo_dir):
    """A tiny model with dropout (so that train mode would draw from the global RNG) and its run's preview."""
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, Path("unused"), dropout=0.5, image_channels=3))
    torch.manual_seed(0)
    model = build_model(config)
    from guided_diffusion.data import index_dataset, split_train_val
    train, val = split_train_val(index_dataset(demo_dir, "multi-class", 4, require_test=False).train, 0.2, 0)
    preview = watch.make_preview(config, build_diffusion(config), val, train, torch.device("cpu"), False)
    return model, preview, val


def test_the_preview_shows_the_held_out_masks_topped_up_with_training_masks(preview_setup):
    _, preview, val = preview_setup
    assert len(val) == 2 and preview.masks.shape == (4, 32, 32)
    assert preview.diffusion.num_timesteps == watch.PREVIEW_STEPS == 50
    assert preview.guidance_scale == 1.0  # train: no null label to guide with


def test_the_preview_leaves_the_model_in_train_mode_and_the_global_rng_as_it_was(preview_setup):
    model, preview, _ = preview_setup
    model.train()
    modes = []
    hook = model.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    rng = torch.random.get_rng_state()
    try:
        grid = preview.grid(model)
    finally:
        hook.remove()
    assert modes == [False] * watch.PREVIEW_STEPS and model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert grid.shape == (4 * 32 + 3 * 2, 2 * 32 + 2, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid[:32, :32], colorize(preview.masks[0].numpy(), 4))


def test_the_same_weights_give_the_same_preview(preview_setup):
    model, preview, _ = preview_setup
    assert np.array_equal(preview.grid(model), preview.grid(model))  # fixed seeds per mask


def test_finetune_previews_with_the_guidance_sampling_uses_by_default(demo_dir):
    config, _ = config_from_dict("finetune", tiny_train_config(demo_dir, Path("unused"), resume_checkpoint="r"))
    assert config.drop_rate > 0 and watch.preview_guidance(config) == 1.5


# --------------------------------------------------------------------------------------------------------------
# runs


def test_a_train_run_writes_tensorboard_events_previews_and_loss_png(demo_dir, tmp_path):
    result = make_trainer(demo_dir, tmp_path, max_steps=4, preview_interval=2, log_interval=1).run()
    run_dir = result.run_dir
    logged = scalars(run_dir)
    rows = read_csv(run_dir / "log.csv")
    for name in ("loss", "mse", "vb", "lr", "images_per_s"):
        assert [step for step, _ in logged[f"train/{name}"]] == [1, 2, 3, 4], name
        assert [value for _, value in logged[f"train/{name}"]] == pytest.approx(
            [float(row[name]) for row in rows], rel=1e-6), name
    assert [value for _, value in logged["train/ema_rate"]] == pytest.approx([0.1, 2 / 11, 3 / 12, 4 / 13])
    assert all(math.isfinite(value) and value > 0 for _, value in logged["train/grad_norm"])
    epochs = read_csv(run_dir / "epochs.csv")
    assert [value for _, value in logged["epoch/loss"]] == pytest.approx([float(e["loss"]) for e in epochs])
    assert [step for step, _ in logged["preview/seconds"]] == [2, 4]
    previews = sorted(p.name for p in (run_dir / "previews").iterdir())
    assert previews == ["step_000002.png", "step_000004.png"]
    assert Image.open(run_dir / "previews" / previews[0]).size == (2 * 32 + 2, 4 * 32 + 3 * 2)
    assert Image.open(run_dir / "loss.png").size == (800, 450)


def test_previews_change_no_weight_and_resume_stays_exact(demo_dir, tmp_path):
    plain = make_trainer(demo_dir, tmp_path / "a", max_steps=4, tensorboard=False, preview_interval=0)
    plain.run()
    first = make_trainer(demo_dir, tmp_path / "b", max_steps=2, preview_interval=1)
    first.run()
    resumed = make_trainer(demo_dir, tmp_path / "b", max_steps=4, preview_interval=2)
    resumed.start_from(first.checkpoint_dir / "latest.pt")
    result = resumed.run()
    assert sorted(p.name for p in (result.run_dir / "previews").iterdir()) == ["step_000004.png"]
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    for name, tensor in plain.ema.state_dict().items():
        assert torch.equal(tensor, resumed.ema.state_dict()[name]), name


def test_a_run_without_the_tensorboard_package_trains_and_says_so_in_one_line(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    lines = []
    result = make_trainer(demo_dir, tmp_path, log=lines.append, max_steps=2, preview_interval=2).run()
    assert [line for line in lines if "TensorBoard" in line] == [watch.TENSORBOARD_MISSING]
    assert watch.TENSORBOARD_MISSING.startswith("TensorBoard logging is off: the tensorboard package is not "
                                                "installed")
    assert not (result.run_dir / "tensorboard").exists()
    assert (result.run_dir / "previews" / "step_000002.png").is_file() and (result.run_dir / "loss.png").is_file()
    assert result.state.step == 2


# --------------------------------------------------------------------------------------------------------------
# loss.png


def test_the_loss_plot_shows_the_step_losses_the_epoch_losses_and_the_best_epoch():
    steps = [{"step": str(s), "loss": str(1 / s)} for s in range(1, 7)] + [{"step": "7", "loss": "nan"}]
    epochs = [{"epoch": "0", "step": "3", "loss": "0.6"}, {"epoch": "1", "step": "6", "loss": "0.25"}]
    figure = watch.loss_figure(steps, epochs, best_epoch=1, title="train_001: loss")
    step_line, epoch_line, best = figure.axes[0].lines
    assert list(step_line.get_xdata()) == [1, 2, 3, 4, 5, 6]  # the NaN row is left out
    assert list(step_line.get_ydata()) == pytest.approx([1 / s for s in range(1, 7)])
    assert (list(epoch_line.get_xdata()), list(epoch_line.get_ydata())) == ([3, 6], [0.6, 0.25])
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([6], [0.25]) and best.get_label() == "best.pt: epoch 1"
    assert figure.axes[0].get_yscale() == "log"

"""Training levers for small models: crops, Min-SNR weighting, bf16 autocast, lr warm-up and offset noise."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, tiny_train_config
from guided_diffusion import model_setup
from guided_diffusion.config import config_from_dict
from guided_diffusion.diffusion import GaussianDiffusion
from guided_diffusion.errors import ConfigError
from guided_diffusion.sampling.sample import run_sampling
from guided_diffusion.model_setup import bf16_autocast, cpu_bf16_support
from guided_diffusion.train import Trainer, crop_windows

BF16_LOSS_TOLERANCE = 1e-2
"""Per-step relative difference allowed between the losses of a bf16 and an fp32 run from the same seed (tiny
model, 4 steps, lr 1e-3). Observed on the CI CPU (avx512_bf16): at most 1e-4, so the bound has 100x room."""

BF16_SAMPLE_TOLERANCE = 2.0
"""Mean absolute difference allowed between bf16 and fp32 samples, in uint8 levels (5 DDIM steps, same noise).
Observed on the CI CPU with the 2-step conftest model: 0.03 levels (a few pixels differ by up to 7)."""

NO_CPU_BF16 = pytest.mark.skipif(cpu_bf16_support() == "none", reason="this CPU has no bf16 support (oneDNN)")


def make_trainer(demo_dir: Path, root: Path, **changes) -> Trainer:
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, root, **changes))
    return Trainer(config, "train", log=lambda *_: None)


def log_column(run_dir: Path, column: str) -> list[float]:
    with open(run_dir / "log.csv", newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def sample_images(demo_dir: Path, model_path: Path, root: Path, **changes) -> dict[str, np.ndarray]:
    values = {"data_dir": str(demo_dir), "model_path": str(model_path), "root_log_dir": str(root),
              "num_samples": 2, "batch_size": 2, "sampler": "ddim", "steps": 5, **changes}
    config, _ = config_from_dict("sample", values)
    run_dir = Path(run_sampling(config, given=set(values), log=lambda *_: None)["run_dir"])
    return {p.name: np.asarray(Image.open(p)) for p in sorted((run_dir / "samples").glob("*.png"))}


def config_error(**changes) -> str:
    values = {"data_dir": "datasets/demo", "num_classes": 4, **TINY_MODEL, **changes}
    with pytest.raises(ConfigError) as info:
        config_from_dict("train", values, "configs/x.json")
    message = str(info.value)
    assert "\n" not in message
    return message


# --- crop_size -------------------------------------------------------------------------------------------------
def test_crop_training_feeds_the_same_window_of_image_and_mask(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path, crop_size=16)
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = ((rows * 32 + cols) / 1024 + torch.arange(4.0)[:, None, None, None]).expand(4, 3, 32, 32).clone()
    masks = torch.randint(0, 4, (4, 32, 32), generator=torch.Generator().manual_seed(0))
    state = trainer.generator.get_state()
    draws = trainer._draws(4)
    trainer.generator.set_state(state)
    seen = {}
    losses, forward = trainer.diffusion.training_losses, trainer.forward
    trainer.diffusion.training_losses = lambda model, x, t, noise, *rest: \
        seen.update(x_start=x, noise=noise) or losses(model, x, t, noise, *rest)
    trainer.forward = lambda x, t, y: seen.update(labels=y) or forward(x, t, y)
    trainer.train_step(images, masks)

    flip = draws["flip"]
    flipped_images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    flipped_masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    assert len(set(zip(draws["top"].tolist(), draws["left"].tolist()))) > 1  # a position per image
    assert torch.equal(seen["x_start"], crop_windows(flipped_images, draws["top"], draws["left"], 16))
    assert torch.equal(seen["labels"].argmax(1), crop_windows(flipped_masks, draws["top"], draws["left"], 16))
    assert seen["noise"].shape == (4, 3, 16, 16)


def test_a_model_trained_on_crops_samples_full_size_images(demo_dir, tmp_path):
    result = make_trainer(demo_dir, tmp_path / "train", crop_size=16, max_steps=1).run()
    assert json.loads((result.run_dir / "config.json").read_text())["crop_size"] == 16
    samples = sample_images(demo_dir, result.run_dir, tmp_path / "sample")
    assert [image.shape for image in samples.values()] == [(32, 32, 3)] * 2


def test_crop_size_must_fit_the_unet_and_the_image():
    assert "key 'crop_size'" in config_error(crop_size=18) and "multiple of 4" in config_error(crop_size=18)
    assert "up to image_size 32, got 64" in config_error(crop_size=64)
    assert "key 'crop_size'" in config_error(crop_size=-4)


# --- min_snr_gamma ---------------------------------------------------------------------------------------------
def fixed_model(x: torch.Tensor, _timesteps: torch.Tensor) -> torch.Tensor:
    """A stand-in for the UNet: 6 output channels (eps and variance values) that depend on x."""
    return torch.cat([0.5 * x, torch.tanh(x)], dim=1)


def loss_inputs():
    g = torch.Generator().manual_seed(0)
    x_start = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    return x_start, torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 8, 8, generator=g)


def test_min_snr_off_is_the_plain_hybrid_loss_bit_for_bit():
    diffusion = GaussianDiffusion.create(1000, "linear", rescale_timesteps=True)
    plain = diffusion.training_losses(fixed_model, *loss_inputs())
    off = diffusion.training_losses(fixed_model, *loss_inputs(), min_snr_gamma=0.0)
    for name in ("loss", "mse", "vb"):
        assert torch.equal(plain[name], off[name]), name
    assert torch.equal(off["loss"], off["mse"] + off["vb"])


def test_min_snr_weights_the_mse_term_by_min_snr_gamma_over_snr():
    diffusion = GaussianDiffusion.create(1000, "linear", rescale_timesteps=True)
    weights = diffusion.min_snr_weights(torch.tensor([0, 999]), 5.0)
    # by hand: at t = 0 beta = 1e-4, so alpha_bar = 0.9999 and SNR = 0.9999 / 0.0001 = 9999: weight 5 / 9999
    assert weights[0].item() == pytest.approx(5 / 9999, rel=1e-9)
    assert weights[1].item() == 1.0  # SNR(999) ~ 4e-5 < 5
    plain = diffusion.training_losses(fixed_model, *loss_inputs())
    on = diffusion.training_losses(fixed_model, *loss_inputs(), min_snr_gamma=5.0)
    w = diffusion.min_snr_weights(loss_inputs()[1], 5.0).float()
    assert torch.equal(on["mse"], plain["mse"]) and torch.equal(on["vb"], plain["vb"])  # logged terms unweighted
    torch.testing.assert_close(on["loss"], w * plain["mse"] + plain["vb"])
    assert on["loss"][0] < plain["loss"][0] and on["loss"][3] == plain["loss"][3]


def test_min_snr_gamma_must_not_be_negative():
    assert "key 'min_snr_gamma' must be >= 0" in config_error(min_snr_gamma=-1)


# --- precision -------------------------------------------------------------------------------------------------
def test_use_fp16_is_isdm_s_spelling_of_precision_auto():
    values = {"data_dir": "d", "num_classes": 4, **TINY_MODEL}
    assert config_from_dict("train", {**values, "use_fp16": True})[0].precision == "auto"
    assert config_from_dict("train", {**values, "use_fp16": True, "precision": "bf16"})[0].precision == "bf16"
    assert config_from_dict("train", values)[0].precision == "fp32"
    assert "key 'precision' must be one of 'fp32', 'bf16', 'auto'" in config_error(precision="fp16")


def test_precision_chooses_bf16_autocast_by_device_and_cpu_support(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not bf16_autocast("fp32", cpu) and not bf16_autocast("fp32", cuda)
    assert bf16_autocast("bf16", cuda)
    for support, bf16, auto in (("native", True, True), ("emulated", True, False), ("none", False, False)):
        monkeypatch.setattr(model_setup, "cpu_bf16_support", lambda s=support: s)
        assert (bf16_autocast("bf16", cpu), bf16_autocast("auto", cpu)) == (bf16, auto), support


@NO_CPU_BF16
def test_bf16_training_on_cpu_tracks_the_fp32_losses(demo_dir, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(demo_dir, tmp_path / precision, precision=precision, max_steps=4)
        assert trainer.autocast == (precision == "bf16")
        runs[precision] = trainer.run().run_dir
    for column in ("loss", "mse"):
        fp32, bf16 = log_column(runs["fp32"], column), log_column(runs["bf16"], column)
        assert len(fp32) == len(bf16) == 4
        assert fp32 != bf16  # bf16 really ran
        for step, (a, b) in enumerate(zip(fp32, bf16)):
            assert abs(a - b) <= BF16_LOSS_TOLERANCE * abs(a), (column, step, a, b)


@NO_CPU_BF16
def test_bf16_sampling_on_cpu_is_close_to_fp32(demo_dir, trained_run, tmp_path):
    fp32 = sample_images(demo_dir, trained_run, tmp_path / "fp32", precision="fp32")
    bf16 = sample_images(demo_dir, trained_run, tmp_path / "bf16", precision="bf16")
    assert fp32.keys() == bf16.keys()
    assert any(not np.array_equal(fp32[name], bf16[name]) for name in fp32)  # bf16 really ran
    for name in fp32:
        difference = np.abs(fp32[name].astype(float) - bf16[name].astype(float))
        assert difference.mean() <= BF16_SAMPLE_TOLERANCE, (name, difference.mean())


# --- lr_warmup_steps -------------------------------------------------------------------------------------------
def test_lr_warms_up_linearly_and_combines_with_annealing(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path / "a", lr=1e-3, lr_warmup_steps=4)
    assert [trainer._lr(step) for step in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    both = make_trainer(demo_dir, tmp_path / "b", lr=1e-3, lr_warmup_steps=4, lr_anneal_steps=10)
    assert both._lr(1) == pytest.approx(1e-3 * 0.5 * 0.9) and both._lr(10) == 0.0
    result = make_trainer(demo_dir, tmp_path / "c", lr=1e-3, lr_warmup_steps=4, max_steps=2).run()
    assert log_column(result.run_dir, "lr") == pytest.approx([2.5e-4, 5e-4])  # the lr each step used
    assert "key 'lr_warmup_steps'" in config_error(lr_warmup_steps=-1)


# --- offset_noise ----------------------------------------------------------------------------------------------
def test_offset_noise_adds_a_per_image_per_channel_constant_drawn_last(demo_dir, tmp_path):
    trainer = make_trainer(demo_dir, tmp_path, offset_noise=0.5)
    plain = make_trainer(demo_dir, tmp_path, offset_noise=0.0)
    draws, plain_draws = trainer._draws(4), plain._draws(4)
    g = torch.Generator().manual_seed(trainer.config.seed + 1)  # the trainer's generator, replayed
    torch.rand(4, generator=g), torch.randint(0, 1000, (4,), generator=g)  # flip, t
    base = torch.randn(4, 3, 32, 32, generator=g)
    torch.rand(4, generator=g)  # keep_label
    offset = torch.randn(4, 3, 1, 1, generator=g)
    assert torch.equal(draws["noise"], base + 0.5 * offset)
    assert torch.equal(plain_draws["noise"], base)
    for name in ("flip", "t", "keep_label"):
        assert torch.equal(draws[name], plain_draws[name]), name
    assert "key 'offset_noise' must be >= 0" in config_error(offset_noise=-0.1)


# --- resume ----------------------------------------------------------------------------------------------------
def test_resume_stays_exact_with_every_lever_on(demo_dir, tmp_path):
    levers = {"crop_size": 16, "min_snr_gamma": 5.0, "lr_warmup_steps": 2, "offset_noise": 0.1, "save_interval": 1}
    straight = make_trainer(demo_dir, tmp_path / "a", max_steps=3, **levers)
    straight.run()
    first = make_trainer(demo_dir, tmp_path / "b", max_steps=1, **levers)
    first.run()
    resumed = make_trainer(demo_dir, tmp_path / "b", max_steps=3, **levers)
    assert resumed.start_from(first.checkpoint_dir / "latest.pt").startswith("resuming exactly")
    resumed.run()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name

"""The mask generator (guided_diffusion/masks/model.py) and its quality report (masks/report.py), on CPU, toy sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from guided_diffusion.masks import model as mm
from guided_diffusion.config import config_from_dict
from guided_diffusion.masks.train import mask_config, train_mask_generator
from guided_diffusion.errors import CheckpointError, ConfigError, DatasetError
from guided_diffusion.masks.report import markdown, mask_report, wasserstein_1, write_mask_report
from guided_diffusion.sampling.sample import preview_mask_selection, run_sampling

TOY_GENERATOR = {"image_size": 16, "channel_mult": "1,2", "attention_resolutions": "8", "batch_size": 4,
                 "log_interval": 1, "save_interval": 2}


def generator_config(data_dir: Path, root: Path, **changes) -> dict:
    return {"data_dir": str(data_dir), "num_classes": 4, "root_log_dir": str(root), **TOY_GENERATOR, **changes}


@pytest.fixture(scope="module")
def generator_run(demo_dir, tmp_path_factory) -> Path:
    """A toy generator (16 px) trained for 4 steps on the demo dataset: tests read it, none trains it further."""
    root = tmp_path_factory.mktemp("masks")
    return train_mask_generator(generator_config(demo_dir, root, max_steps=4), log=lambda *_: None).run_dir


# --- encoding -------------------------------------------------------------------------------------------------

def test_decode_of_encode_is_the_mask():
    mask = torch.randint(0, 5, (3, 9, 7))
    encoded = mm.encode(mask, 5)
    assert encoded.shape == (3, 5, 9, 7) and set(encoded.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(mm.decode(encoded), mask)


def test_encode_refuses_class_ids_outside_the_classes():
    with pytest.raises(ValueError, match=r"class ids 0\.\.5 outside 0\.\.4"):
        mm.encode(torch.tensor([[[0, 5]]]), 5)


def test_the_presence_vector_is_the_set_of_classes_and_a_dropped_label_is_null():
    """The training step passes the one-hot mask (zeroed when dropped); the network gets its presence map."""
    seen = {}

    def network(x, t, labels):
        seen["labels"] = labels
        return x

    mask = torch.tensor([[[0, 2], [2, 2]], [[1, 1], [1, 1]]])
    labels = mm.one_hot(mask, 4)
    labels[1] = 0  # the second sample's label dropped (drop_rate / presence_drop)
    mm.PresenceConditioned(network)(torch.zeros(2, 4, 2, 2), torch.zeros(2), labels)
    assert seen["labels"].shape == (2, 4, 1, 1)
    assert seen["labels"][:, :, 0, 0].tolist() == [[1, 0, 1, 0], [0, 0, 0, 0]]
    assert mm.presence(mask, 4).tolist() == [[1, 0, 1, 0], [0, 1, 0, 0]]


# --- training and sampling ----------------------------------------------------------------------------------

def test_training_writes_a_masks_run_whose_checkpoint_carries_config_and_presence(generator_run):
    assert generator_run.name == "masks_001"
    payload = torch.load(generator_run / "checkpoints" / "latest.pt", weights_only=True)
    assert payload["action"] == "masks" and payload["config"]["num_classes"] == 4
    assert payload["config"]["image_channels"] == 4 and payload["train_state"]["step"] == 4
    table = payload["mask_generator"]["presence"]
    assert sum(table["counts"]) == 12 and all(row[0] == 1 for row in table["vectors"])  # all hold background


def test_a_masks_run_resumes_from_another_and_counts_its_steps_on(generator_run, demo_dir):
    result = train_mask_generator(generator_config(demo_dir, generator_run.parent, max_steps=6,
                                                   resume_checkpoint=str(generator_run)), log=lambda *_: None)
    assert result.run_dir.name == "masks_002" and result.state.step == 6


def test_mask_source_may_name_the_folder_of_masks_runs(generator_run):
    """As model_path takes Results/demo (its newest train/finetune run), mask_source takes a folder of masks_NNN
    runs: the one whose checkpoint was written last."""
    newest = max((p for p in generator_run.parent.glob("masks_*/checkpoints/best.pt")), key=lambda p: p.stat().st_mtime)
    assert mm.load_mask_generator(generator_run.parent).checkpoint_path == newest


def test_a_masks_run_cannot_start_from_an_image_model(trained_run, demo_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"not a mask generator checkpoint; a masks run starts from a masks "
                                              r"run only"):
        train_mask_generator(generator_config(demo_dir, tmp_path, max_steps=1, resume_checkpoint=str(trained_run)))


def test_the_shipped_config_loads():
    values = json.loads((Path(__file__).resolve().parents[1] / "configs" / "config_masks.json").read_text())
    config = mask_config(values)
    assert config.image_channels == config.num_classes == 4 and config.drop_rate == config.presence_drop


def test_sampling_gives_integer_masks_in_the_class_range_at_the_asked_size(generator_run):
    generator = mm.load_mask_generator(generator_run)
    masks = mm.sample_masks(generator, 3, steps=3, image_size=32, seed=5)
    assert masks.shape == (3, 32, 32) and masks.dtype == np.int64
    assert masks.min() >= 0 and masks.max() <= 3


def test_a_mask_is_the_same_whatever_the_batch_size(generator_run):
    generator = mm.load_mask_generator(generator_run)
    together = mm.sample_masks(generator, 3, steps=2, seed=7, batch_size=3)
    one_by_one = mm.sample_masks(generator, 3, steps=2, seed=7, batch_size=1)
    assert np.array_equal(together, one_by_one)


def test_the_presence_condition_reaches_the_network_when_sampling(generator_run):
    """Mechanical: the asked presence vectors are what the network receives, and they change its output (the
    next test checks that the condition is learned)."""
    generator = mm.load_mask_generator(generator_run)
    received = []
    model = generator.model

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, t, labels):
            received.append(labels.clone())
            return self.inner(x, t, labels)

    generator.model = Recording()
    mm.sample_masks(generator, 4, steps=3, seed=0, required_classes=[3])  # 2 evaluations
    labels = received[0]
    assert len(received) == 2 and all(torch.equal(r, labels) for r in received)
    assert labels.shape == (4, 4, 1, 1) and bool((labels[:, 3] == 1).all())
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        with_crack = model(x, t, mm.presence_map(torch.tensor([[1.0, 0, 0, 1]])))
        without = model(x, t, mm.presence_map(torch.tensor([[1.0, 1, 0, 0]])))
    assert not torch.allclose(with_crack, without)


# --- v prediction ---------------------------------------------------------------------------------------------

def test_a_v_model_that_predicts_the_true_v_gives_the_true_x0_and_eps_and_zero_mse():
    from guided_diffusion.diffusion import GaussianDiffusion
    diffusion = GaussianDiffusion.create(1000, "cosine", prediction="v", rescale_timesteps=True)
    g = torch.Generator().manual_seed(0)
    x_start, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = diffusion.q_sample(x_start, t, noise)
    v = diffusion.v_target(x_start, t, noise)
    out = diffusion.p_mean_variance(torch.cat([v, torch.zeros_like(v)], 1), x_t, t, clip_denoised=False)
    torch.testing.assert_close(out.pred_xstart, x_start, atol=1e-5, rtol=0)  # well conditioned even at t = 999
    torch.testing.assert_close(out.eps, noise, atol=1e-5, rtol=0)
    terms = diffusion.training_losses(lambda x, ts: torch.cat([v, torch.zeros_like(v)], 1), x_start, t, noise)
    assert terms["mse"].abs().max() < 1e-10
    respaced = diffusion.respaced(list(range(0, 1000, 40)))
    assert respaced.prediction == "v"


def test_min_snr_for_a_v_model_weights_the_x0_error_as_for_an_eps_model():
    from guided_diffusion.diffusion import GaussianDiffusion
    t = torch.tensor([0, 300, 999])
    eps_model, v_model = (GaussianDiffusion.create(1000, "cosine", prediction=p) for p in ("eps", "v"))
    alpha_bar = eps_model.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    # the squared eps error is SNR x the squared x0 error, the squared v error (SNR + 1) x it:
    # both weight it min(SNR, 5)
    torch.testing.assert_close(eps_model.min_snr_weights(t, 5.0) * snr, snr.clamp(max=5.0))
    torch.testing.assert_close(v_model.min_snr_weights(t, 5.0) * (snr + 1), snr.clamp(max=5.0))


# --- class weighting ------------------------------------------------------------------------------------------

def test_pixel_weights_of_one_leave_the_loss_as_it_is_and_others_weight_each_pixel_error():
    from guided_diffusion.diffusion import GaussianDiffusion
    diffusion = GaussianDiffusion.create(1000, "cosine")
    g = torch.Generator().manual_seed(0)
    x_start, noise = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g)
    output = torch.randn(2, 6, 4, 4, generator=g)
    t = torch.tensor([10, 700])
    plain = diffusion.training_losses(lambda x, ts: output, x_start, t, noise)
    ones = diffusion.training_losses(lambda x, ts: output, x_start, t, noise, pixel_weights=torch.ones(2, 1, 4, 4))
    torch.testing.assert_close(ones["loss"], plain["loss"], rtol=0, atol=0)
    weights = torch.zeros(2, 1, 4, 4)
    weights[:, :, 0, 0] = 16.0  # all the weight on one pixel: the loss's MSE is that pixel's squared error
    one_pixel = diffusion.training_losses(lambda x, ts: output, x_start, t, noise, pixel_weights=weights)
    expected = ((noise - output[:, :3]) ** 2)[:, :, 0, 0].mean(dim=1)
    torch.testing.assert_close(one_pixel["loss"] - one_pixel["vb"], expected)
    torch.testing.assert_close(one_pixel["mse"], plain["mse"])  # the logged MSE stays unweighted


def test_class_weights_average_one_over_the_pixels_and_power_one_weighs_every_class_alike():
    from guided_diffusion.masks.train import class_weights
    masks = [np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]),
             np.zeros((4, 4), np.int64)]  # 29 background pixels, 2 of class 1, 1 of class 2, none of class 3
    counts = np.array([29, 2, 1, 0])
    shares = mm.PresenceTable.of_masks(masks, 4).class_pixel_shares()
    assert np.allclose(shares, counts / counts.sum())
    off = class_weights(shares, 0.0)
    assert off.tolist() == [1.0, 1.0, 1.0, 0.0]
    for power in (0.5, 1.0):
        weights = class_weights(shares, power).numpy()
        assert np.isclose((counts * weights).sum() / counts.sum(), 1.0) and weights[3] == 0.0
        assert weights[2] > weights[1] > weights[0]
    totals = counts[:3] * class_weights(shares, 1.0).numpy()[:3]
    assert np.allclose(totals, totals[0])


def test_a_class_weighted_generator_weighs_its_batch_pixels_by_class_and_trains(demo_dir, tmp_path):
    from guided_diffusion.masks.train import MaskTrainer
    trainer = MaskTrainer(mask_config(generator_config(demo_dir, tmp_path / "w", max_steps=2,
                                                       class_weight_power=0.5)), log=lambda *_: None)
    masks = torch.tensor([[[0, 1], [2, 3]]])
    weights = trainer.pixel_weights(mm.encode(masks, 4))
    assert weights.shape == (1, 1, 2, 2)
    assert weights.flatten().tolist() == trainer.class_weights[torch.tensor([0, 1, 2, 3])].tolist()
    assert trainer.class_weights[0] < 1.0 < trainer.class_weights[1:].min()  # the demo's background is most pixels
    off = MaskTrainer(mask_config(generator_config(demo_dir, tmp_path / "o", max_steps=2, class_weight_power=0)),
                      log=lambda *_: None)
    assert off.pixel_weights(mm.encode(masks, 4)) is None  # off: the loss is the plain one, unchanged
    assert trainer.run().state.step == 2
    with pytest.raises(ConfigError, match=r"'class_weight_power' must be in \[0, 1\] \(0 = off\), got 2(\.0)?$"):
        mask_config(generator_config(demo_dir, tmp_path, class_weight_power=2))


def test_an_eps_generator_trains_samples_and_keeps_its_prediction_in_the_checkpoint(demo_dir, tmp_path):
    """v is the default; eps (the SDM's parametrisation) is the other choice, and sampling follows the checkpoint."""
    run = train_mask_generator(generator_config(demo_dir, tmp_path, max_steps=2, prediction="eps"),
                               log=lambda *_: None).run_dir
    generator = mm.load_mask_generator(run)
    assert generator.config.prediction == "eps" and mm.sampling_diffusion(generator.config, 5).prediction == "eps"
    masks = mm.sample_masks(generator, 2, steps=3)
    assert masks.shape == (2, 16, 16) and 0 <= masks.min() and masks.max() < 4


def test_a_checkpoint_from_before_the_prediction_key_samples_as_the_eps_model_it_is(generator_run, tmp_path):
    """Generators trained before `prediction` and `class_weight_power` existed predicted eps with the plain loss;
    their checkpoints lack the keys, and today's defaults (v, 0.25) must not be read into them."""
    payload = torch.load(generator_run / "checkpoints" / "latest.pt", weights_only=False)
    assert (payload["config"]["prediction"], payload["config"]["class_weight_power"]) == ("v", 0.25)  # defaults
    for key in ("prediction", "class_weight_power"):
        del payload["config"][key]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    generator = mm.load_mask_generator(old)
    assert (generator.config.prediction, generator.config.class_weight_power) == ("eps", 0.0)
    assert mm.sampling_diffusion(generator.config, 5).prediction == "eps"


def test_resuming_a_generator_with_another_prediction_is_one_error_line(generator_run, demo_dir, tmp_path):
    latest = generator_run / "checkpoints" / "latest.pt"
    config = generator_config(demo_dir, tmp_path, max_steps=6, prediction="eps", resume_checkpoint=str(latest))
    with pytest.raises(ConfigError, match=r"that generator predicts v, this run's 'prediction' is eps; set "
                                          r"\"prediction\": \"v\" to continue it$"):
        train_mask_generator(config, log=lambda *_: None)
    assert not list(tmp_path.glob("masks_*/checkpoints/*.pt"))  # nothing trained


def test_an_unknown_prediction_is_one_error_line(demo_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"key .prediction. must be one of .eps., .v., got \"x0\"$"):
        mask_config(generator_config(demo_dir, tmp_path, prediction="x0"))


def test_the_presence_condition_is_learned_on_a_toy_set(tmp_path):
    """Learned, at toy size: 16 masks of 8 px whose top half is class 1 or class 2 (the presence vector is the
    only clue which); 200 steps (~8 s on one CPU thread). Asked for class 1 or 2, 30-31 of 32 masks hold it as
    their larger class at guidance 2 (seeds 0 and 1; 28-29 without guidance); 16 would be chance."""
    for kind in ("images", "masks"):
        (tmp_path / "toy" / "train" / kind).mkdir(parents=True)
    for i in range(16):
        mask = np.zeros((8, 8), np.uint8)
        mask[:4] = 1 + i % 2
        Image.fromarray(mask).save(tmp_path / "toy" / "train" / "masks" / f"{i:03d}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "toy" / "train" / "images" / f"{i:03d}.png")
    config = {"data_dir": str(tmp_path / "toy"), "num_classes": 3, "root_log_dir": str(tmp_path / "runs"),
              "image_size": 8, "channel_mult": "1", "attention_resolutions": "", "batch_size": 8, "max_steps": 200,
              "max_epochs": 1000, "lr": 1e-3, "ema_rate": 0.99}
    generator = mm.load_mask_generator(train_mask_generator(config, log=lambda *_: None).run_dir)
    honoured = 0
    for asked in (1, 2):
        rows = np.zeros((16, 3))
        rows[:, [0, asked]] = 1
        masks = mm.sample_masks(generator, 16, steps=10, presence_rows=rows, seed=1, guidance_scale=2.0)
        honoured += sum(int((mask == asked).sum() > (mask == 3 - asked).sum()) for mask in masks)
    assert honoured >= 26


def test_presence_vectors_for_required_classes_hold_them_at_their_training_rates():
    masks = [np.array([[0, 3]]), np.array([[0, 3], [1, 1]]), np.array([[0, 0]]), np.array([[0, 3]])]
    table = mm.PresenceTable.of_masks(masks, 4)
    draws = [tuple(table.draw([3], np.random.default_rng(i))) for i in range(200)]
    assert set(draws) == {(1, 0, 0, 1), (1, 1, 0, 1)}
    assert 0.5 < draws.count((1, 0, 0, 1)) / len(draws) < 0.85  # 2 of the 3 masks with class 3


def test_for_inpaint_presence_vectors_hold_a_defect_even_where_most_training_masks_hold_none():
    masks = [np.array([[0, 0]])] * 50 + [np.array([[0, 2]]), np.array([[1, 2]])]
    table = mm.PresenceTable.of_masks(masks, 3)
    draws = {tuple(table.draw([], np.random.default_rng(i), with_defect=True)) for i in range(100)}
    assert draws == {(1, 0, 1), (0, 1, 1)}
    assert (1, 0, 0) in {tuple(table.draw([], np.random.default_rng(i))) for i in range(100)}  # without: mostly


def test_inpaint_with_a_generator_whose_masks_never_hold_a_defect_is_one_error_line():
    table = mm.PresenceTable.of_masks([np.array([[0, 0]])], 3)
    with pytest.raises(ConfigError, match=r"mode 'inpaint' paints defects \(classes other than 0\), but no "
                                          r"training mask of the mask generator \(mask_source\) holds one$"):
        table.draw([], np.random.default_rng(0), with_defect=True)


def test_generated_masks_without_a_defect_are_redrawn_at_fresh_indices(monkeypatch):
    def fake_sample_masks(generator, count, *, first_index, **_):  # masks 0, 1 and 3 empty, the others not
        return np.stack([np.full((2, 2), int(first_index + i not in (0, 1, 3))) for i in range(count)])

    monkeypatch.setattr(mm, "sample_masks", fake_sample_masks)
    lines = []
    indices, masks = mm._redraw_defect_free(None, [0, 1, 2], fake_sample_masks(None, 3, first_index=0), 0, [],
                                            {}, lines.append)
    assert indices == [5, 4, 2] and all(mask.any() for mask in masks)  # 0 -> 3 (empty) -> 5; 1 -> 4
    assert lines == ["inpaint: redrew 3 generated masks that held no defect pixel"]


def test_the_mean_mask_is_that_of_the_training_masks_with_the_presence_vector():
    table = mm.PresenceTable.of_masks([np.array([[0, 0], [0, 3]]), np.array([[0, 0], [0, 0]])], 4)
    assert table.mean_mask(np.array([1, 0, 0, 1])).tolist() == [0.5, -1.0, -1.0, -0.5]
    assert table.mean_mask(np.zeros(4)).tolist() == [0.75, -1.0, -1.0, -0.75]  # null: all training masks


def test_the_top_step_takes_the_mean_mask_as_its_prediction_of_x0():
    diffusion = mm.sampling_diffusion(mask_config({"data_dir": "x", "num_classes": 3}), 10)
    a_top, a_below = (float(diffusion.alphas_cumprod[i]) for i in (-1, -2))
    mean, eps = torch.tensor([[0.9, -0.8, -1.0]]), torch.randn(1, 3, 4, 4)
    x_top = a_top ** 0.5 * mean[:, :, None, None] + (1 - a_top) ** 0.5 * eps
    expected = a_below ** 0.5 * mean[:, :, None, None] + (1 - a_below) ** 0.5 * eps  # DDIM with x0 = the mean
    assert torch.allclose(mm.first_step(diffusion, x_top, mean), expected, atol=1e-6)


def test_asking_for_a_class_no_training_mask_holds_is_one_error_line():
    table = mm.PresenceTable.of_masks([np.array([[0, 1]])], 3)
    with pytest.raises(ConfigError, match=r"no training mask of the generator holds classes \[2\]"):
        table.draw([2], np.random.default_rng(0))


def test_a_generator_of_another_class_count_than_the_image_model_is_one_error_line(generator_run):
    generator = mm.load_mask_generator(generator_run)
    with pytest.raises(ConfigError, match=r"makes masks of 4 classes but the image model has 6; train the mask "
                                          r"generator on the same dataset and num_classes"):
        mm.check_num_classes(generator, 6)


def test_an_empty_dataset_is_one_error_line(tmp_path):
    for kind in ("images", "masks"):
        (tmp_path / "data" / "train" / kind).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"train/masks is empty \(no \.png files\)"):
        train_mask_generator(generator_config(tmp_path / "data", tmp_path / "runs", max_steps=1))


def test_an_image_model_is_not_a_mask_generator(trained_run):
    with pytest.raises(CheckpointError, match="not a mask generator checkpoint"):
        mm.load_mask_generator(trained_run)


def test_config_keys_are_checked_strictly(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'presence_drop' must be in \[0, 1\), got 1\.5"):
        mask_config({"data_dir": "x", "num_classes": 4, "presence_drop": 1.5})
    with pytest.raises(ConfigError, match=r"unknown key 'guidance' for masks"):
        mask_config({"data_dir": "x", "num_classes": 4, "guidance": 2})
    config = mask_config({"data_dir": "x", "num_classes": 5, "presence_drop": 0.3})
    assert config.image_channels == 5 and config.drop_rate == 0.3 and config.unet_spec().in_channels == 5


# --- post-processing -----------------------------------------------------------------------------------------

def _largest_step(mask: np.ndarray) -> int:
    """The largest jump, from one row to the next, of the column where a class-1-then-0 row turns to 0."""
    edge = [int((row == 0).argmax()) for row in mask if (row == 0).any()]
    return int(np.abs(np.diff(edge)).max())


def test_upsampling_rounds_staircases_and_keeps_the_class_shares():
    small = (np.add.outer(np.arange(8), np.arange(8)) < 8).astype(np.int64)  # a diagonal edge
    big = mm.upsample_mask(small, 32, 2)
    nearest = np.kron(small, np.ones((4, 4), np.int64))
    assert big.shape == (32, 32) and set(np.unique(big)) == {0, 1}
    assert _largest_step(nearest) == 4 and _largest_step(big) <= 2
    assert abs(int(big.sum()) - int(nearest.sum())) <= 0.05 * nearest.size
    assert np.array_equal(mm.upsample_mask(small, 8, 2), small)


def test_small_components_are_filled_with_the_class_around_them():
    mask = np.zeros((12, 12), np.int64)
    mask[2:8, 2:8] = 1
    mask[4, 4] = 0  # a one-pixel hole in class 1
    mask[10, 10:12] = 2  # a two-pixel speckle of class 2 on the background
    cleaned = mm.remove_small_components(mask, min_area=3)
    expected = mask.copy()
    expected[4, 4], expected[10, 10:12] = 1, 0
    assert np.array_equal(cleaned, expected)


# --- the report ---------------------------------------------------------------------------------------------

def _square(size: int, top: int, left: int, side: int, class_id: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), np.int64)
    mask[top:top + side, left:left + side] = class_id
    return mask


def test_a_copy_of_a_training_mask_has_novelty_iou_one():
    real = [_square(16, 2, 2, 4), _square(16, 8, 8, 6, 2)]
    generated = [real[1].copy(), _square(16, 2, 4, 4)]  # a copy, and a square shifted by half its side
    novelty = mask_report(generated, real, 3)["novelty"]
    assert novelty["iou_with_nearest"] == [1.0, pytest.approx(8 / 24, abs=1e-6)]
    assert novelty["nearest_real"] == [1, 0] and novelty["near_copy_share"] == 0.5


def test_a_mask_of_background_alone_is_no_near_copy_of_the_training_masks():
    """Defect datasets hold many defect-free masks: an empty generated mask copies no layout. Novelty is measured
    on the masks that hold a defect, and the background-only shares are reported beside it."""
    real = [_square(16, 2, 2, 4), np.zeros((16, 16), np.int64)]
    generated = [np.zeros((16, 16), np.int64), _square(16, 2, 4, 4), np.zeros((16, 16), np.int64)]
    novelty = mask_report(generated, real, 2)["novelty"]
    assert novelty["compared"] == 1 and novelty["generated_index"] == [1]
    assert novelty["iou_with_nearest"] == [pytest.approx(8 / 24, abs=1e-6)] and novelty["near_copy_share"] == 0.0
    assert novelty["background_only_share"] == {"generated": pytest.approx(2 / 3, abs=1e-6), "real": 0.5}
    empty = mask_report([np.zeros((16, 16), np.int64)], real, 2)
    assert empty["novelty"]["compared"] == 0 and empty["novelty"]["near_copy_share"] is None
    assert "novelty not measured" in markdown(empty)


def test_the_report_counts_shares_objects_sizes_and_speckles():
    real = [_square(10, 0, 0, 5), _square(10, 5, 5, 5)]  # one 25-pixel object each
    generated = [_square(10, 0, 0, 5) | _square(10, 8, 8, 1), _square(10, 0, 0, 10, 0)]  # +1 speckle; empty
    report = mask_report(generated, real, 2, min_area=4)
    assert report["pixel_share"]["real"] == [0.75, 0.25]
    assert report["pixel_share"]["generated"] == [0.87, 0.13]
    assert report["holding_share"]["generated"] == [1.0, 0.5]
    assert report["objects_per_mask"]["generated"][1] == 1.0 and report["objects_per_mask"]["real"][1] == 1.0
    # class 1 sizes: real log10(0.25) twice; generated log10(0.25) and log10(0.01): W1 = half of log10(25)
    assert report["object_sizes"]["classes"]["class_1"]["w1_log10_size"] == pytest.approx(np.log10(25) / 2, abs=1e-6)
    validity = report["validity"]
    assert validity["speckle_share_generated"] == pytest.approx(1 / 4)  # 4 components: 2 backgrounds, 2 of class 1
    assert validity["speckle_share_real"] == 0.0


def test_masks_cleaned_of_specks_are_compared_with_real_masks_cleaned_alike():
    """A real set keeps its specks and a cleaned generated set has none: compared as they are, the sizes and the
    masks holding a class differ by the cleaning alone; `clean_real_below` cleans the real masks the same way."""
    real = [_square(10, 0, 0, 5) | _square(10, 8, 8, 1), _square(10, 5, 5, 5)]  # a 25-px object each, +1 speck
    generated = [_square(10, 0, 0, 5), _square(10, 5, 5, 5)]  # the same, cleaned of its specks (min_area 4)
    as_they_are = mask_report(generated, real, 2, min_area=4)
    assert as_they_are["object_sizes"]["classes"]["class_1"]["w1_log10_size"] > 0.3
    alike = mask_report(generated, real, 2, min_area=4, clean_real_below=4)
    assert alike["object_sizes"]["classes"]["class_1"]["w1_log10_size"] == 0.0
    assert alike["pixel_share"]["real"] == alike["pixel_share"]["generated"]
    assert alike["validity"]["real_cleaned_below"] == 4 and as_they_are["validity"]["real_cleaned_below"] == 0
    assert "both cleaned of components under 4 pixels" in markdown(alike)
    assert "cleaned" not in markdown(as_they_are).splitlines()[2]


def test_wasserstein_1_is_the_earth_movers_distance():
    from scipy.stats import wasserstein_distance
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=50), rng.normal(1.0, 2.0, size=30)
    assert wasserstein_1(u, v) == pytest.approx(wasserstein_distance(u, v))
    assert wasserstein_1(u, u) == 0.0 and wasserstein_1(u, []) is None


def test_the_report_files_are_written(tmp_path):
    report = mask_report([_square(16, 2, 2, 4)], [_square(16, 2, 2, 4), _square(16, 9, 9, 3, 2)], 3,
                         class_names=["background", "scratch", "spot"])
    write_mask_report(tmp_path, report)
    text = (tmp_path / "masks_report.md").read_text()
    assert "near-copies (IoU > 0.9): 100.0%" in text and "| 1 scratch |" in text
    assert Image.open(tmp_path / "masks_report.png").size[0] > 0 and (tmp_path / "masks_report.json").is_file()


# --- sampling images for generated masks (key mask_source) and main.py masks ------------------------------------

def sample_with_generator(demo_dir: Path, model_path: Path, mask_source: Path, root: Path, **changes) -> Path:
    values = {"data_dir": str(demo_dir), "model_path": str(model_path), "mask_source": str(mask_source),
              "root_log_dir": str(root), "num_samples": 3, "batch_size": 3, "sampler": "ddim", "steps": 2, "s": 1.0,
              "mask_steps": 2, **changes}
    config, _ = config_from_dict("sample", values)
    return Path(run_sampling(config, given=set(values), log=lambda *_: None)["run_dir"])


def test_sampling_with_a_mask_source_writes_the_generated_masks_as_labels_and_the_report(
        demo_dir, trained_run, generator_run, tmp_path):
    run_dir = sample_with_generator(demo_dir, trained_run, generator_run, tmp_path, seed=3)
    labels = {p.name: np.asarray(Image.open(p)) for p in sorted((run_dir / "labels").glob("*.png"))}
    assert list(labels) == ["00000_gen00000.png", "00001_gen00001.png", "00002_gen00002.png"]
    assert not list((run_dir / "images").glob("*.png"))  # a generated mask has no real image
    expected = mm.sample_masks(mm.load_mask_generator(generator_run), 3, seed=3, steps=2, image_size=32)
    assert all(np.array_equal(label, mask) for label, mask in zip(labels.values(), expected))
    assert "## Novelty" in (run_dir / "masks_report.md").read_text()
    assert (run_dir / "masks_report.png").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["mask_source"] == str(generator_run)


def test_inpainting_generated_masks_paints_one_image_per_mask_each_with_a_defect(demo_dir, trained_run,
                                                                               generator_run, tmp_path, monkeypatch):
    asked = []

    def masks_with_a_defect_at_odd_indices(generator, count, *, image_size, with_defect, first_index=0, **_):
        asked.append(with_defect)
        masks = np.zeros((count, image_size, image_size), np.int64)
        for i in range(count):
            masks[i, 4:12, 4:12] = (first_index + i) % 2  # a square of class 1 at odd mask indices
        return masks

    monkeypatch.setattr(mm, "sample_masks", masks_with_a_defect_at_odd_indices)
    run_dir = sample_with_generator(demo_dir, trained_run, generator_run, tmp_path, mode="inpaint",
                                    resample_steps=0)
    labels = {p.name: np.asarray(Image.open(p)) for p in sorted((run_dir / "labels").glob("*.png"))}
    assert list(labels) == ["00000_gen00003.png", "00001_gen00001.png", "00002_gen00005.png"]  # 0 -> 3, 2 -> 4 -> 5
    assert all(label.any() for label in labels.values()) and set(asked) == {True}
    assert len(list((run_dir / "samples").glob("*.png"))) == 3
    assert json.loads((run_dir / "summary.json").read_text()).get("skipped_masks_without_defects", 0) == 0


def test_balance_args_choose_among_generated_masks_asked_for_each_class(demo_dir, trained_run, generator_run,
                                                                         tmp_path):
    run_dir = sample_with_generator(demo_dir, trained_run, generator_run, tmp_path, num_samples=4,
                                    balance_args={"max_class_dif": 0.5})
    report = json.loads((run_dir / "balance.json").read_text())
    assert report["candidates"] == 8 and list(report["candidate_groups"]) == ["none", "1", "2", "3"]
    assert len(list((run_dir / "labels").glob("*.png"))) == 4


def toy_dataset(root: Path, num_classes: int, count: int = 4, size: int = 16) -> Path:
    """`count` masks holding a square of class 1 + i % (num_classes - 1), with blank images beside them."""
    for kind in ("images", "masks"):
        (root / "train" / kind).mkdir(parents=True)
    for i in range(count):
        mask = _square(size, i, i, size // 2, 1 + i % (num_classes - 1)).astype(np.uint8)
        Image.fromarray(mask).save(root / "train" / "masks" / f"{i:03d}.png")
        Image.fromarray(np.zeros((size, size), np.uint8)).save(root / "train" / "images" / f"{i:03d}.png")
    return root


def test_a_dry_run_with_balance_args_chooses_generated_masks_and_samples_nothing(demo_dir, trained_run,
                                                                                generator_run, tmp_path):
    values = {"data_dir": str(demo_dir), "model_path": str(trained_run), "mask_source": str(generator_run),
              "root_log_dir": str(tmp_path), "num_samples": 2, "mask_steps": 2, "balance_args": {}}
    config, _ = config_from_dict("sample", values)
    run_dir = preview_mask_selection(config, set(values), log=lambda *_: None)
    assert (run_dir / "balance.json").is_file() and (run_dir / "masks_report.md").is_file()
    assert not (run_dir / "samples").exists()


def test_a_mask_source_of_another_class_count_is_one_error_line(demo_dir, trained_run, tmp_path):
    data = toy_dataset(tmp_path / "three", num_classes=3)
    three = train_mask_generator(generator_config(data, tmp_path / "runs", num_classes=3, max_steps=1),
                                 log=lambda *_: None).run_dir
    with pytest.raises(ConfigError, match=r"makes masks of 3 classes but the image model \(model_path\) has 4; "
                                          r"train the mask generator on the same dataset and num_classes"):
        sample_with_generator(demo_dir, trained_run, three, tmp_path)


def test_a_mask_source_needs_a_mode_without_real_images(demo_dir):
    with pytest.raises(ConfigError, match=r"key 'mask_source' makes new masks for mode 'noise' or 'inpaint'; mode "
                                          r"'variation' needs the real image"):
        config_from_dict("sample", {"data_dir": str(demo_dir), "model_path": "m", "mask_source": "g",
                                    "mode": "variation", "strength": 0.5})


def test_main_masks_trains_a_generator_into_a_masks_run(demo_dir, tmp_path):
    config = tmp_path / "config_masks.json"
    config.write_text(json.dumps(generator_config(demo_dir, tmp_path / "runs", max_steps=1)))
    assert main.main(["masks", "-c", str(config)]) == 0
    assert (tmp_path / "runs" / "masks_001" / "checkpoints" / "best.pt").is_file()


# --- mask_retries: redraw masks that hold other classes than their presence vector ---------------------------

def test_presence_misses_count_the_classes_asked_for_and_missing_or_held_and_not_asked_for():
    masks = np.array([[[0, 1], [1, 0]], [[0, 0], [0, 0]], [[2, 3], [0, 0]], [[3, 3], [3, 3]]])
    rows = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    # exact; class 1 missing; class 3 held and not asked for; the null vector asks for nothing
    assert mm.presence_misses(masks, rows).tolist() == [0, 1, 1, 0]


def test_a_redrawn_mask_gets_noise_of_its_own_and_the_first_draw_keeps_the_seed_it_had():
    assert mm.mask_seed(3, 7, 0) == mm.mask_seed(3, 7)
    assert len({mm.mask_seed(3, 7, attempt) for attempt in range(4)}) == 4


def fake_sampler_holding_class_1_where_its_noise_says(sampler, diffusion, denoise, x, noise, **_):
    """Stands in for the sampler: mask i is background, plus class 1 in a corner when x[i, 0, 0, 0] > x[i, 0, 0, 1]
    (the mean mask the top step adds is the same at every pixel, so the draw's noise decides: half the draws)."""
    out = torch.full_like(x, -1.0)
    out[:, 0] = 1.0
    out[:, 1, :2, :2] = torch.where(x[:, 0, 0, 0] > x[:, 0, 0, 1], 2.0, -1.0)[:, None, None]
    return out


def test_mask_retries_redraw_only_masks_that_differ_from_their_vector_and_keep_the_closest_draw(
        generator_run, monkeypatch):
    monkeypatch.setattr(mm, "run_sampler", fake_sampler_holding_class_1_where_its_noise_says)
    generator = mm.load_mask_generator(generator_run)
    rows = np.array([[1, 1, 0, 0]] * 12)  # every mask asked to hold background and class 1
    first = mm.sample_masks(generator, 12, steps=2, seed=4, presence_rows=rows)
    lines = []
    redrawn = mm.sample_masks(generator, 12, steps=2, seed=4, presence_rows=rows, retries=5, log=lines.append)
    before, after = mm.presence_misses(first, rows), mm.presence_misses(redrawn, rows)
    assert 0 < (before > 0).sum() < 12  # the seeds give some masks class 1 at the first draw, not all
    assert np.array_equal(redrawn[before == 0], first[before == 0])  # a matching mask is never redrawn
    differed, left = int((before > 0).sum()), int((after > 0).sum())
    assert (after <= before).all() and left < differed  # up to 5 more draws, each holding class 1 about 1/2
    assert len(lines) == 1 and re.fullmatch(
        rf"generated masks: {differed} of 12 held other classes than their presence vector; (\d+) redrawn "
        rf"\(mask_retries 5\), {left} still differ", lines[0])
    assert int(re.search(r"; (\d+) redrawn", lines[0]).group(1)) >= differed  # each differing mask once at least
    again = mm.sample_masks(generator, 12, steps=2, seed=4, presence_rows=rows, retries=5, batch_size=5)
    assert np.array_equal(again, redrawn)  # deterministic, whatever the batch size


def test_mask_retries_never_keep_a_draw_further_from_the_vector(generator_run):
    """On the toy generator's real (untrained, noisy) masks: per mask, the kept draw differs from its vector in
    no more classes than the first draw did."""
    generator = mm.load_mask_generator(generator_run)
    rows = np.array([[1, 0, 0, 1]] * 4 + [[1, 1, 0, 0]] * 4)
    first = mm.sample_masks(generator, 8, steps=2, seed=2, presence_rows=rows)
    kept = mm.sample_masks(generator, 8, steps=2, seed=2, presence_rows=rows, retries=2)
    before, after = mm.presence_misses(first, rows), mm.presence_misses(kept, rows)
    assert (after <= before).all() and np.array_equal(kept[before == 0], first[before == 0])


def test_negative_mask_retries_are_one_error_line(demo_dir):
    with pytest.raises(ConfigError, match=r"key 'mask_retries' must be >= 0 \(0 = off\), got -1"):
        config_from_dict("sample", {"data_dir": str(demo_dir), "model_path": "x", "mode": "noise",
                                    "mask_source": "y", "mask_retries": -1})


@pytest.mark.parametrize("height, width", [(6, 6), (6, 9), (17, 32), (64, 64)])
def test_a_presence_vector_modulates_as_the_same_condition_spread_over_every_pixel(height, width):
    """SPADE computes a 1×1 condition's scale and shift on a 5×5 map and spreads it (the mask generator's speed-up):
    the output is the full-size computation's, and so are the gradients."""
    from guided_diffusion.unet import SPADEGroupNorm

    torch.manual_seed(0)
    layer = SPADEGroupNorm(32, 6)
    x = torch.randn(2, 32, height, width, requires_grad=True)
    presence = torch.tensor([[1.0, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0]])[:, :, None, None]
    spread = presence.expand(-1, -1, height, width)
    fast, full = layer(x, presence), layer(x, spread)
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)
    inputs = [x, *layer.parameters()]
    for got, want in zip(torch.autograd.grad(fast.square().sum(), inputs),
                         torch.autograd.grad(full.square().sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))

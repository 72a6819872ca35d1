"""Variations (SDEdit) and inpainting (RePaint): the sampler options, the painted region, pairing and placement,
the `mode` keys end to end, and crack/blowhole masks painted onto defect-free magnetic tiles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MAGNETIC_TILE, TINY_MODEL, tiny_train_config
from guided_diffusion.config import config_from_dict
from guided_diffusion.data import index_dataset, load_mask
from guided_diffusion.diffusion import GaussianDiffusion, make_betas, space_timesteps
from guided_diffusion.errors import ConfigError, DatasetError
from guided_diffusion.guidance import conditional_denoiser
from guided_diffusion.sampling.inpaint import (Placement, choose_placement, known_region_hook, noised_start,
                                               paint_region, pair_backgrounds, place_mask, start_step)
from guided_diffusion.sampling.sample import run_sampling
from guided_diffusion.samplers import SAMPLERS, PerImageNoise, log_snr_timesteps, run_sampler
from guided_diffusion.train import Trainer
from guided_diffusion.unet import SDMUNet

MODEL_PROCESS = GaussianDiffusion.create(1000, "linear", rescale_timesteps=True)


# ---------------------------------------------------------------------------------------------------------------
# The painted region, the SDEdit start


def test_painted_region_is_the_defects_dilated_by_the_margin_in_euclidean_distance():
    mask = np.zeros((9, 9), np.int64)
    mask[4, 4] = 3
    assert paint_region(mask, 0).sum() == 1 and paint_region(mask, 0)[4, 4]
    painted = paint_region(mask, 2)
    rows, columns = np.mgrid[0:9, 0:9]
    assert np.array_equal(painted, (rows - 4) ** 2 + (columns - 4) ** 2 <= 4)  # 13 pixels; (2, 2) is 2.8 away
    assert not paint_region(np.zeros((5, 5), np.int64), 3).any()


@pytest.mark.parametrize("diffusion", [
    GaussianDiffusion(make_betas("linear", 300), rescale_timesteps=True),  # ISDM's rescaled schedule
    MODEL_PROCESS.respaced(space_timesteps(1000, "ddim50")),
    MODEL_PROCESS.respaced(log_snr_timesteps(MODEL_PROCESS, 20)),
], ids=["rescaled300", "ddim50", "log-snr20"])
def test_strength_names_a_noise_level_whatever_the_step_grid(diffusion):
    assert start_step(diffusion, 1.0) == diffusion.num_timesteps - 1
    steps = [start_step(diffusion, s) for s in np.linspace(0.01, 1.0, 25)]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    timestep = int(diffusion.timestep_map[start_step(diffusion, 0.5)])
    gaps = (diffusion.timestep_map - 0.5 * (diffusion.original_num_steps - 1)).abs()
    assert abs(timestep - 0.5 * (diffusion.original_num_steps - 1)) == gaps.min()


def test_noised_start_is_the_noise_itself_at_the_top_and_mostly_the_image_low_down():
    diffusion = MODEL_PROCESS.respaced(space_timesteps(1000, "10"))
    image, eps = torch.full((1, 3, 4, 4), 0.5), torch.randn(1, 3, 4, 4)
    assert torch.equal(noised_start(diffusion, image, 9, eps), eps)
    low = noised_start(diffusion, image, 0, eps)
    assert (low - image).abs().max() < 0.1 and not torch.equal(low, image)


# ---------------------------------------------------------------------------------------------------------------
# Sampler options: start step, hook, resampling jumps


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config, _ = config_from_dict("train", {"data_dir": "unused", "num_classes": 3, **TINY_MODEL})
    model = SDMUNet(config.unet_spec()).eval()
    for p in model.parameters():  # zero-initialised output layers would make the model's output trivial
        p.data.add_(0.02 * torch.randn_like(p))
    return model


def tiny_denoiser(model, calls: list | None = None):
    labels = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2)),
                                         3).permute(0, 3, 1, 2).float()
    guided = conditional_denoiser(model, labels, 1.5)

    def denoise(x, t):
        if calls is not None:
            calls.append(t[0].item())
        return guided(x, t)

    return denoise


def half_known(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A background in [-1, 1] and a keep mask that keeps the left half."""
    background = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    keep = torch.zeros(batch, 1, 32, 32, dtype=torch.bool)
    keep[..., :16] = True
    return background, keep


@pytest.mark.parametrize("resample_steps", [0, 2])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_keeps_the_known_region_and_generates_the_rest(tiny_model, sampler, resample_steps):
    diffusion = MODEL_PROCESS.respaced(log_snr_timesteps(MODEL_PROCESS, 4))
    background, keep = half_known()
    noise = PerImageNoise([1, 2], (3, 32, 32))
    hook = known_region_hook(diffusion, background, keep, noise)
    with torch.no_grad():
        x = run_sampler(sampler, diffusion, tiny_denoiser(tiny_model), noise(), noise, eta=0.5, hook=hook,
                        resample_steps=resample_steps)
    assert torch.equal(x[..., :16], background[..., :16])
    assert (x[..., 16:] - background[..., 16:]).abs().mean() > 0.05


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_start_step_runs_only_the_steps_below_it_and_jumps_add_one_evaluation_per_step(tiny_model, sampler):
    diffusion = MODEL_PROCESS.respaced(space_timesteps(1000, "8"))
    background, keep = half_known()
    noise = PerImageNoise([1, 2], (3, 32, 32))
    calls, progress = [], []
    with torch.no_grad():
        run_sampler(sampler, diffusion, tiny_denoiser(tiny_model, calls), noise(), noise, start_step=4,
                    hook=known_region_hook(diffusion, background, keep, noise), resample_steps=2,
                    progress=progress.append)
    expected = [float(diffusion.model_timesteps(torch.tensor([s]))) for s in (4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1, 0)]
    assert calls == pytest.approx(expected)  # steps 4..1 three times each (two jumps back), step 0 once
    assert sum(progress) == 5  # progress counts steps, not evaluations


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_without_the_new_options_a_sampler_runs_as_before(tiny_model, sampler):
    diffusion = MODEL_PROCESS.respaced(log_snr_timesteps(MODEL_PROCESS, 3))
    results = []
    for options in ({}, {"start_step": 2, "hook": None, "resample_steps": 0}):
        noise = PerImageNoise([7, 8], (3, 32, 32))
        with torch.no_grad():
            results.append(run_sampler(sampler, diffusion, tiny_denoiser(tiny_model), noise(), noise, eta=0.5,
                                       **options))
    assert torch.equal(*results)


def test_dpm_solver_takes_a_first_order_step_after_a_jump(tiny_model):
    """DPM-Solver++'s first-order step is DDIM's (eta 0): right after the first jump both samplers must agree;
    had the solver kept its history it would extrapolate from the x0 predicted before the jump."""
    diffusion = MODEL_PROCESS.respaced(log_snr_timesteps(MODEL_PROCESS, 4))
    seen: dict[str, list[torch.Tensor]] = {}
    for sampler in ("ddim", "dpm++2m"):
        seen[sampler] = []
        noise = PerImageNoise([3, 4], (3, 32, 32))
        hook = lambda x, step, out=seen[sampler]: out.append(x.clone()) or x  # noqa: E731
        with torch.no_grad():
            run_sampler(sampler, diffusion, tiny_denoiser(tiny_model), noise(), noise, hook=hook, resample_steps=1)
    first_try, after_jump, next_step = 0, 1, 2  # the hook sees x after each try of step 3, then of step 2
    gap = [(seen["ddim"][k] - seen["dpm++2m"][k]).abs().max().item() for k in (first_try, after_jump, next_step)]
    assert gap[0] < 1e-4 and gap[1] < 1e-4  # float rounding of two forms of one update
    assert gap[2] > 1e-2  # step 2's first try follows step 3's last try with no jump between: second order


def test_resampling_jumps_need_a_hook(tiny_model):
    diffusion = MODEL_PROCESS.respaced(space_timesteps(1000, "3"))
    noise = PerImageNoise([1, 2], (3, 32, 32))
    with pytest.raises(ValueError, match="resample_steps needs a hook"):
        run_sampler("ddim", diffusion, tiny_denoiser(tiny_model), noise(), noise, resample_steps=1)


# ---------------------------------------------------------------------------------------------------------------
# Pairing and placement


def test_round_robin_pairing_uses_every_background_equally_in_a_seeded_order():
    chosen = pair_backgrounds(43, 10, "round-robin", seed=3)
    counts = np.bincount(chosen, minlength=10)
    assert counts.max() - counts.min() <= 1 and sorted(chosen[:10]) == list(range(10))
    assert pair_backgrounds(43, 10, "round-robin", seed=4) != chosen


def test_random_pairing_is_per_image_so_the_first_images_do_not_depend_on_the_count():
    chosen = pair_backgrounds(50, 7, "random", seed=1)
    assert pair_backgrounds(10, 7, "random", seed=1) == chosen[:10]
    assert pair_backgrounds(50, 7, "random", seed=2) != chosen
    assert len(set(chosen)) > 4


def test_placement_flips_and_moves_the_mask_without_losing_defect_pixels():
    mask = np.zeros((16, 16), np.int64)
    mask[2:5, 3:9] = 3
    mask[6, 4] = 1
    placed = [place_mask(mask, choose_placement(mask, 0, np.random.default_rng(s), True, True)) for s in range(12)]
    for result in placed:
        assert np.array_equal(np.bincount(result.ravel(), minlength=4), np.bincount(mask.ravel(), minlength=4))
    assert len({result.tobytes() for result in placed}) > 6
    assert np.array_equal(place_mask(mask, Placement(0)), mask)


# ---------------------------------------------------------------------------------------------------------------
# Config keys


@pytest.mark.parametrize("changes, message", [
    ({"mode": "inpaint", "strength": 0.0}, "key 'strength' must be in \\(0, 1\\]"),
    ({"mode": "variation", "strength": 1.5}, "key 'strength' must be in \\(0, 1\\]"),
    ({"strength": 0.5}, "key 'strength' applies to mode 'variation', 'inpaint', 'harmonize', 'blend', but mode is "
                        "'noise'"),
    ({"mode": "harmonize"}, "key 'strength' must be below 1 with mode 'harmonize'"),
    ({"mode": "blend", "inpaint_margin": 0}, "key 'inpaint_margin' must be at least 1 with mode 'blend'"),
    ({"background_dir": "tiles"}, "key 'background_dir' is only used with mode 'inpaint', 'harmonize', 'blend', "
                                  "'paste'"),
    ({"mode": "inpaint", "inpaint_margin": -1}, "key 'inpaint_margin' must be >= 0"),
    ({"mode": "inpaint", "resample_steps": -1}, "key 'resample_steps' must be >= 0"),
    ({"mode": "repaint"}, "key 'mode' must be one of 'noise', 'variation', 'inpaint'"),
    ({"mode": "inpaint", "pairing": "sequential"}, "key 'pairing' must be one of 'random', 'round-robin'"),
])
def test_bad_mode_keys_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict("sample", {"data_dir": "d", "model_path": "m", **changes})


# ---------------------------------------------------------------------------------------------------------------
# End to end on the demo dataset


@pytest.fixture(scope="module")
def trained_run(demo_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, root, max_steps=2, drop_rate=0.2))
    return Trainer(config, "train", log=lambda *_: None).run().run_dir


@pytest.fixture(scope="module")
def background_dir(tmp_path_factory) -> Path:
    """Three smooth grey backgrounds of other sizes than the model's (non-square, larger)."""
    folder = tmp_path_factory.mktemp("backgrounds")
    rng = np.random.default_rng(0)
    for k, (height, width) in enumerate([(40, 48), (64, 50), (36, 36)]):
        rows = np.linspace(0, 1, height)[:, None]
        gray = 90 + 80 * rows + 6 * rng.normal(size=(height, width))
        Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).save(folder / f"plate{k}.png")
    return folder


def sample(data_dir: Path, model_path: Path, root: Path, **changes) -> Path:
    values = {"data_dir": str(data_dir), "model_path": str(model_path), "root_log_dir": str(root),
              "num_samples": 3, "batch_size": 3, "timestep_respacing": "5", "s": 1.5, **changes}
    config, _ = config_from_dict("sample", values)
    return Path(run_sampling(config, given=set(values), log=lambda *_: None)["run_dir"])


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def assert_known_region_is_the_background(run_dir: Path, margin: int) -> None:
    samples, backgrounds, labels = (pngs(run_dir / sub) for sub in ("samples", "images", "labels"))
    assert samples.keys() == backgrounds.keys() == labels.keys() and samples
    changed = 0
    for name, image in samples.items():
        painted = paint_region(labels[name], margin)
        assert painted.any() and not painted.all()
        assert np.array_equal(image[~painted], backgrounds[name][~painted]), name
        changed += int((image[painted] != backgrounds[name][painted]).any())
    assert changed == len(samples)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_every_background_byte_outside_the_painted_region(demo_dir, trained_run, background_dir,
                                                                          tmp_path, sampler):
    run_dir = sample(demo_dir, trained_run, tmp_path, mode="inpaint", background_dir=str(background_dir),
                     sampler=sampler, timestep_respacing="", steps=4, inpaint_margin=1, resample_steps=1)
    assert_known_region_is_the_background(run_dir, margin=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "inpaint" and summary["backgrounds"] == 3
    listing = json.loads((run_dir / "inpaint.json").read_text())
    assert {entry["background"] for entry in listing} <= {"plate0.png", "plate1.png", "plate2.png"}


def test_inpainting_is_deterministic_and_independent_of_the_batch_size(demo_dir, trained_run, background_dir,
                                                                      tmp_path):
    options = {"mode": "inpaint", "background_dir": str(background_dir), "mask_flip": True,
               "mask_placement": "random", "resample_steps": 1, "timestep_respacing": "4"}
    first = sample(demo_dir, trained_run, tmp_path / "a", batch_size=3, **options)
    again = sample(demo_dir, trained_run, tmp_path / "b", batch_size=3, **options)
    one_by_one = sample(demo_dir, trained_run, tmp_path / "c", batch_size=1, **options)
    for sub in ("samples", "images", "labels"):
        assert pngs(first / sub).keys() == pngs(again / sub).keys()
        for name, image in pngs(first / sub).items():
            assert np.array_equal(image, pngs(again / sub)[name])
            difference = np.abs(image.astype(int) - pngs(one_by_one / sub)[name].astype(int))
            assert difference.max() <= 1, (sub, name)  # float rounding may flip a uint8 level, nothing more
    assert (first / "inpaint.json").read_text() == (one_by_one / "inpaint.json").read_text()


def test_harmonize_redraws_the_pasted_defect_in_place_and_keeps_the_rest_of_the_background(
        demo_dir, trained_run, background_dir, tmp_path):
    options = {"background_dir": str(background_dir), "mask_flip": True, "mask_placement": "random",
               "inpaint_margin": 1, "resample_steps": 0, "sampler": "ddim", "timestep_respacing": "", "steps": 20}
    pasted = sample(demo_dir, trained_run, tmp_path / "paste", mode="paste", num_classes=4,
                    image_size=TINY_MODEL["image_size"], **options)
    harmonized = sample(demo_dir, trained_run, tmp_path / "harmonize", mode="harmonize", strength=0.1, **options)
    inpainted = sample(demo_dir, trained_run, tmp_path / "inpaint", mode="inpaint", strength=0.1, **options)
    assert_known_region_is_the_background(harmonized, margin=1)
    assert json.loads((harmonized / "inpaint.json").read_text()) == json.loads((pasted / "paste.json").read_text())
    paste_images, harmonized_images, inpainted_images = (pngs(run / "samples") for run in
                                                         (pasted, harmonized, inpainted))
    labels = pngs(harmonized / "labels")
    assert labels.keys() == pngs(pasted / "labels").keys()
    for name, label in labels.items():
        defect = label != 0
        assert np.array_equal(label, pngs(pasted / "labels")[name])  # the same defect in the same place
        to_paste = lambda images: np.abs(images[name][defect].astype(int) - paste_images[name][defect]).mean()
        # at a low strength harmonize keeps the pasted defect; inpaint, starting from the background, does not
        assert to_paste(harmonized_images) < 0.5 * to_paste(inpainted_images), name
    summary = json.loads((harmonized / "summary.json").read_text())
    assert summary["mode"] == "harmonize" and summary["strength"] == 0.1 and summary["start_step"] < 19


def test_blend_keeps_the_pasted_defect_byte_for_byte_and_paints_only_the_seam_around_it(
        demo_dir, trained_run, background_dir, tmp_path):
    options = {"background_dir": str(background_dir), "mask_flip": True, "mask_placement": "random",
               "inpaint_margin": 2, "resample_steps": 1, "timestep_respacing": "4"}
    pasted = sample(demo_dir, trained_run, tmp_path / "paste", mode="paste", num_classes=4,
                    image_size=TINY_MODEL["image_size"], **options)
    blended = sample(demo_dir, trained_run, tmp_path / "blend", mode="blend", **options)
    assert json.loads((blended / "inpaint.json").read_text()) == json.loads((pasted / "paste.json").read_text())
    paste_images, blended_images, labels = (pngs(run / sub) for run, sub in
                                            ((pasted, "samples"), (blended, "samples"), (blended, "labels")))
    assert blended_images.keys() == paste_images.keys() == labels.keys() and labels
    for name, label in labels.items():
        assert np.array_equal(label, pngs(pasted / "labels")[name])
        seam = paint_region(label, 2) & (label == 0)
        assert seam.any()
        # every pixel off the seam, the real defect's included, is the pasted image's byte; the seam is redrawn
        assert np.array_equal(blended_images[name][~seam], paste_images[name][~seam]), name
        assert (blended_images[name][seam] != paste_images[name][seam]).any(), name
    summary = json.loads((blended / "summary.json").read_text())
    assert summary["mode"] == "blend" and summary["inpaint_margin"] == 2 and summary["resample_steps"] == 1


def test_variation_at_strength_one_is_sampling_from_noise(demo_dir, trained_run, tmp_path):
    from_noise = pngs(sample(demo_dir, trained_run, tmp_path / "a", seed=4) / "samples")
    variation = pngs(sample(demo_dir, trained_run, tmp_path / "b", seed=4, mode="variation", strength=1.0)
                     / "samples")
    assert from_noise.keys() == variation.keys()
    for name in from_noise:
        assert np.array_equal(from_noise[name], variation[name]), name


def test_variation_starts_lower_and_keeps_its_source_image_in_images(demo_dir, trained_run, tmp_path):
    noise_run = sample(demo_dir, trained_run, tmp_path / "a", seed=4)
    run_dir = sample(demo_dir, trained_run, tmp_path / "b", seed=4, mode="variation", strength=0.4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] < summary["steps"] - 1 and summary["steps_run"] == summary["start_step"] + 1
    sources, samples = pngs(run_dir / "images"), pngs(run_dir / "samples")
    assert sources.keys() == pngs(noise_run / "images").keys()
    for name in sources:
        assert np.array_equal(sources[name], pngs(noise_run / "images")[name])  # the real image of the mask
        assert not np.array_equal(samples[name], pngs(noise_run / "samples")[name])


def test_the_progress_bar_counts_the_whole_steps_a_variation_runs(demo_dir, trained_run, tmp_path, capsys):
    # 3 images in batches of 2 from a lower start: 2 batches x steps_run steps, never a fraction of a step.
    run_dir = sample(demo_dir, trained_run, tmp_path, mode="variation", strength=0.4, batch_size=2)
    steps_run = json.loads((run_dir / "summary.json").read_text())["steps_run"]
    counts = re.findall(r"sample: +\d+%\|[^|]*\| *(\S+/\S+) \[", capsys.readouterr().err)
    assert counts and all(re.fullmatch(rf"\d+/{2 * steps_run}", count) for count in counts), counts
    assert counts[-1] == f"{2 * steps_run}/{2 * steps_run}"


def make_background_dir(tmp_path: Path, image: Image.Image | None) -> Path:
    folder = tmp_path / "plates"
    folder.mkdir()
    if image is not None:
        image.save(folder / "bad.png")
    return folder


@pytest.mark.parametrize("image, error, message", [
    (None, ConfigError, "key 'background_dir': .*plates holds no images"),
    (Image.new("RGBA", (40, 40), (90, 90, 90, 0)), DatasetError, "bad.png has transparent pixels"),
    (Image.new("L", (6, 20), 90), DatasetError, "bad.png is 6x20, too small for image_size 32 .*at least 8 px"),
])
def test_unusable_backgrounds_are_one_line_errors_before_anything_is_written(demo_dir, trained_run, tmp_path,
                                                                            image, error, message):
    folder = make_background_dir(tmp_path, image)
    with pytest.raises(error, match=message):
        sample(demo_dir, trained_run, tmp_path / "runs", mode="inpaint", background_dir=str(folder))
    assert not list((tmp_path / "runs").glob("sample_*"))


def test_a_missing_background_dir_is_named(demo_dir, trained_run, tmp_path):
    with pytest.raises(ConfigError, match="key 'background_dir': folder .*nowhere not found"):
        sample(demo_dir, trained_run, tmp_path, mode="inpaint", background_dir=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------------------
# Magnetic tile: crack and blowhole masks painted onto defect-free tiles

BLOWHOLE, CRACK = 1, 3


@pytest.fixture(scope="module")
def tile_subset(tmp_path_factory) -> Path:
    """A small dataset of links to magnetic-tile files: blowhole, crack and defect-free tiles (train), one of each
    for test/. Links, not copies: the real files are used where they are."""
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"{MAGNETIC_TILE} not found")
    root = tmp_path_factory.mktemp("tiles") / "magnetic-tile-subset"
    for split, per_kind in (("train", 4), ("test", 1)):
        found = {BLOWHOLE: [], CRACK: [], 0: []}
        for mask_path in sorted((MAGNETIC_TILE / split / "masks").glob("*.png")):
            defects = set(np.unique(load_mask(mask_path, "multi-class")).tolist()) - {0}
            kind = defects.pop() if len(defects) == 1 else 0 if not defects else None
            if kind in found and len(found[kind]) < per_kind:
                found[kind].append(mask_path)
            if all(len(paths) == per_kind for paths in found.values()):
                break
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for mask_path in (p for paths in found.values() for p in paths):
            image_path = next((MAGNETIC_TILE / split / "images").glob(mask_path.stem + ".*"))
            (root / split / "masks" / mask_path.name).symlink_to(mask_path)
            (root / split / "images" / image_path.name).symlink_to(image_path)
    return root


def test_crack_and_blowhole_masks_painted_on_defect_free_tiles_make_a_valid_dataset(tile_subset, tmp_path):
    config, _ = config_from_dict("train", tiny_train_config(tile_subset, tmp_path / "train", num_classes=6,
                                                            max_steps=2, drop_rate=0.2, val_fraction=0.0))
    run = Trainer(config, "train", log=lambda *_: None).run().run_dir
    run_dir = sample(tile_subset, run, tmp_path / "sample", mode="inpaint", mask_split="train", num_samples=6,
                     pairing="round-robin", mask_flip=True, mask_placement="random", inpaint_margin=1,
                     sampler="dpm++2m", timestep_respacing="", steps=5, resample_steps=1)

    assert_known_region_is_the_background(run_dir, margin=1)
    labels = pngs(run_dir / "labels")
    assert all(set(np.unique(label).tolist()) - {0} <= {BLOWHOLE, CRACK} for label in labels.values())
    assert all((label != 0).any() for label in labels.values())
    free_tiles = {p.name for p in (tile_subset / "train" / "images").iterdir()
                  if not load_mask(tile_subset / "train" / "masks" / f"{p.stem}.png", "multi-class").any()}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_samples"] == 6 and summary["skipped_masks_without_defects"] == len(free_tiles)
    used = [entry["background"] for entry in json.loads((run_dir / "inpaint.json").read_text())]
    assert set(used) == free_tiles  # round-robin: 6 images go round the 4 defect-free tiles

    dataset = tmp_path / "synthetic"  # the run's samples + labels as a dataset folder passes the dataset checks
    for sub, source in (("images", "samples"), ("masks", "labels")):
        (dataset / "train").mkdir(parents=True, exist_ok=True)
        (dataset / "train" / sub).symlink_to(run_dir / source)
    index = index_dataset(dataset, "multi-class", 6, require_test=False)
    assert len(index.train) == 6


def test_a_stopped_inpainting_run_continues_with_the_backgrounds_and_placements_of_an_unbroken_one(
        demo_dir, trained_run, background_dir, tmp_path, monkeypatch):
    """The study's mode: every image's background, flips and shift are drawn from (seed, i), so the images sampled
    after a stop land where an unbroken run puts them, and inpaint.json lists them."""
    from guided_diffusion.sampling import sample as sample_module

    settings = {"mode": "inpaint", "background_dir": str(background_dir), "mask_placement": "random",
                "mask_flip": True, "resample_steps": 0, "num_samples": 5, "batch_size": 2, "auto_resume": True}
    unbroken = sample(demo_dir, trained_run, tmp_path / "unbroken", **settings)
    real_batch = sample_module.sample_batch

    def stop_at_the_third_batch(job, ids, progress):
        if ids == [4]:
            raise KeyboardInterrupt
        return real_batch(job, ids, progress)
    with monkeypatch.context() as patch:
        patch.setattr(sample_module, "sample_batch", stop_at_the_third_batch)
        with pytest.raises(KeyboardInterrupt):
            sample(demo_dir, trained_run, tmp_path / "stopped", **settings)
    resumed = sample(demo_dir, trained_run, tmp_path / "stopped", **settings)
    assert resumed.name == "sample_001" and (resumed / "sampled.txt").read_text() == "0\n1\n2\n3\n4\n"
    for folder in ("images", "labels", "samples"):
        assert pngs(resumed / folder).keys() == pngs(unbroken / folder).keys()
        for name, image in pngs(resumed / folder).items():
            assert np.array_equal(image, pngs(unbroken / folder)[name]), (folder, name)
    assert json.loads((resumed / "inpaint.json").read_text()) == json.loads((unbroken / "inpaint.json").read_text())

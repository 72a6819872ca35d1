"""Grayscale data as one channel: `image_channels` ("auto", 1 or 3), its detection, training and sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MAGNETIC_TILE, TINY_MODEL, tiny_train_config
from guided_diffusion import checkpoint as ckpt
from guided_diffusion.config import config_from_dict
from guided_diffusion.data import (SegmentationDataset, first_colour_image, index_dataset, is_grayscale, load_image)
from guided_diffusion.errors import ConfigError
from guided_diffusion.sampling.sample import load_sampling_model, run_sampling
from guided_diffusion.model_setup import resolve_image_channels
from guided_diffusion.train import Trainer

PARITY_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sdm_parity" / "tiny_sdm.pt"


def copy_dataset(source: Path, target: Path, mode: str) -> Path:
    """The demo dataset with every image converted: "L" = grey files, "grey-rgb" = grey content in RGB files."""
    shutil.copytree(source, target)
    for path in target.glob("*/images/*.png"):
        grey = Image.open(path).convert("L")
        (grey if mode == "L" else grey.convert("RGB")).save(path)
    return target


@pytest.fixture(scope="module")
def grey_dir(demo_dir, tmp_path_factory) -> Path:
    return copy_dataset(demo_dir, tmp_path_factory.mktemp("grey") / "grey", "L")


@pytest.fixture(scope="module")
def grey_run(grey_dir, tmp_path_factory) -> Path:
    """A tiny model trained for 2 steps on the grey dataset with image_channels "auto"."""
    config, _ = config_from_dict("train", tiny_train_config(grey_dir, tmp_path_factory.mktemp("grey_run"), max_steps=2))
    return Trainer(config, "train", log=lambda *_: None).run().run_dir


def train_config(data_dir: Path, root: Path, **changes):
    return config_from_dict("train", tiny_train_config(data_dir, root, **changes))[0]


def sample(data_dir: Path, model_path: Path, root: Path, **changes) -> Path:
    values = {"data_dir": str(data_dir), "model_path": str(model_path), "root_log_dir": str(root),
              "num_samples": 2, "batch_size": 2, "timestep_respacing": "5", **changes}
    config, _ = config_from_dict("sample", values)
    return Path(run_sampling(config, given=set(values), log=lambda *_: None)["run_dir"])


def png_modes(folder: Path) -> set[str]:
    return {Image.open(path).mode for path in folder.glob("*.png")}


def resolved(data_dir: Path, tmp_path: Path) -> tuple[int, list[str]]:
    lines = []
    config = resolve_image_channels(train_config(data_dir, tmp_path), index_dataset(data_dir, "multi-class", 4).train,
                                    lines.append)
    return config.image_channels, lines


# --------------------------------------------------------------------------------------------------------------
# detection


def test_auto_is_1_for_a_dataset_of_grey_files(grey_dir, tmp_path):
    channels, lines = resolved(grey_dir, tmp_path)
    assert channels == 1
    assert lines == ["image_channels auto: 1 (all 12 train/ images are grayscale); the model makes grey images"]


def test_auto_is_3_for_a_colour_dataset_and_names_a_colour_file(demo_dir, tmp_path):
    channels, lines = resolved(demo_dir, tmp_path)
    assert channels == 3
    assert len(lines) == 1 and lines[0].startswith("image_channels auto: 3 (train_") and "has colour" in lines[0]


def test_auto_is_1_for_rgb_files_whose_three_channels_are_equal(demo_dir, tmp_path):
    grey_rgb = copy_dataset(demo_dir, tmp_path / "grey_rgb", "grey-rgb")
    assert Image.open(next(grey_rgb.glob("train/images/*.png"))).mode == "RGB"
    assert resolved(grey_rgb, tmp_path)[0] == 1


def test_one_colour_image_among_grey_ones_makes_it_3(grey_dir, demo_dir, tmp_path):
    mixed = shutil.copytree(grey_dir, tmp_path / "mixed")
    shutil.copy(demo_dir / "train/images/train_007.png", mixed / "train/images/train_007.png")
    paths = [pair.image for pair in index_dataset(mixed, "multi-class", 4).train]
    assert first_colour_image(paths) == mixed / "train/images/train_007.png"
    assert resolved(mixed, tmp_path)[0] == 3


def test_magnetic_tile_is_grayscale():
    paths = sorted((MAGNETIC_TILE / "train" / "images").iterdir())
    assert len(paths) > 100 and first_colour_image(paths) is None


def test_grey_modes_and_16_bit_images_are_grayscale(tmp_path):
    values = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(4, 4)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert is_grayscale(Image.open(tmp_path / "deep.png"))
    assert np.array_equal(load_image(tmp_path / "deep.png", 1), load_image(tmp_path / "deep.png")[:, :, 0])
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([10, 10, 10, 200, 0, 0])
    assert not is_grayscale(palette)


def test_explicit_image_channels_skip_detection(grey_dir, tmp_path):
    lines = []
    config = resolve_image_channels(train_config(grey_dir, tmp_path, image_channels=3), [], lines.append)
    assert config.image_channels == 3 and lines == []


def test_image_channels_must_be_auto_1_or_3(demo_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"key 'image_channels' must be one of 'auto', 1, 3, got 2$"):
        train_config(demo_dir, tmp_path, image_channels=2)


# --------------------------------------------------------------------------------------------------------------
# data


def test_grey_dataset_items_have_one_channel_equal_to_the_rgb_ones(grey_dir):
    pairs = index_dataset(grey_dir, "multi-class", 4).train
    grey = SegmentationDataset(pairs, 16, "multi-class", image_channels=1)[0]["image"]
    rgb = SegmentationDataset(pairs, 16, "multi-class")[0]["image"]
    assert grey.shape == (1, 16, 16) and rgb.shape == (3, 16, 16)
    assert grey.min() >= -1 and grey.max() <= 1
    assert torch.equal(grey[0], rgb[0]) and torch.equal(rgb[0], rgb[1])


def test_colour_images_loaded_as_one_channel_become_their_luma(demo_dir):
    path = next(demo_dir.glob("train/images/*.png"))
    assert np.array_equal(load_image(path, 1), np.asarray(Image.open(path).convert("L")))


# --------------------------------------------------------------------------------------------------------------
# training and sampling


def test_a_grey_model_records_1_channel_and_samples_grey_pngs(grey_dir, grey_run, tmp_path):
    assert json.loads((grey_run / "config.json").read_text())["image_channels"] == 1
    payload = ckpt.load_checkpoint(grey_run / "checkpoints" / "best.pt")
    assert payload["config"]["image_channels"] == 1
    assert payload["model"]["input_blocks.0.0.weight"].shape[1] == 1
    assert payload["model"]["out.2.weight"].shape[0] == 2  # eps + variance values of one channel

    run_dir = sample(grey_dir, grey_run, tmp_path)
    assert json.loads((run_dir / "config.json").read_text())["image_channels"] == 1
    assert png_modes(run_dir / "samples") == {"L"} and png_modes(run_dir / "images") == {"L"}
    assert Image.open(next((run_dir / "samples").glob("*.png"))).size == (32, 32)
    assert Image.open(run_dir / "grid.png").mode == "RGB"


def test_grey_samples_load_in_evaluation_as_rgb(grey_dir, grey_run, tmp_path):
    from evaluation.image_sets import index_sample_folder, load_sample_folder
    run_dir = sample(grey_dir, grey_run, tmp_path)
    images = load_sample_folder(index_sample_folder(run_dir, 4), 4, 32, "resize").images
    assert images.shape == (2, 32, 32, 3) and np.array_equal(images[..., 0], images[..., 2])


def test_grey_variation_and_inpainting_write_grey_pngs(grey_dir, grey_run, tmp_path):
    variation = sample(grey_dir, grey_run, tmp_path / "variation", mode="variation", strength=0.5)
    assert png_modes(variation / "samples") == {"L"}
    backgrounds = tmp_path / "backgrounds"
    backgrounds.mkdir()
    Image.fromarray(np.full((32, 32, 3), (90, 140, 200), np.uint8)).save(backgrounds / "plain.png")  # colour file
    inpainted = sample(grey_dir, grey_run, tmp_path / "inpaint", mode="inpaint", background_dir=str(backgrounds),
                       mask_split="train")
    assert png_modes(inpainted / "samples") == {"L"}
    painted_onto = np.asarray(Image.open(next((inpainted / "images").glob("*.png"))))
    assert painted_onto.shape == (32, 32) and (painted_onto == np.asarray(Image.new("RGB", (1, 1), (90, 140, 200))
                                                                         .convert("L"))[0, 0]).all()


def test_explicit_image_channels_3_on_grey_data_trains_an_rgb_model(grey_dir, tmp_path):
    config = train_config(grey_dir, tmp_path, max_steps=1, image_channels=3)
    run_dir = Trainer(config, "train", log=lambda *_: None).run().run_dir
    assert json.loads((run_dir / "config.json").read_text())["image_channels"] == 3
    weights = ckpt.load_checkpoint(run_dir / "checkpoints" / "best.pt")["ema"]
    assert weights["input_blocks.0.0.weight"].shape[1] == 3 and weights["out.2.weight"].shape[0] == 6


# --------------------------------------------------------------------------------------------------------------
# ISDM/SDM checkpoints and agreement with the checkpoint


def test_a_plain_isdm_state_dict_samples_rgb_even_on_grey_data(grey_dir, trained_run, tmp_path):
    weights = ckpt.extract_state_dict(ckpt.load_checkpoint(trained_run / "checkpoints" / "best.pt"))
    plain = tmp_path / "ema_0.9999_000002.pt"
    torch.save({f"module.{name}": tensor for name, tensor in weights.items()}, plain)  # as ISDM's DDP saves it
    run_dir = sample(grey_dir, plain, tmp_path, num_classes=4, **TINY_MODEL)
    assert json.loads((run_dir / "config.json").read_text())["image_channels"] == 3
    assert png_modes(run_dir / "samples") == {"RGB"}


def test_a_checkpoint_that_records_no_image_channels_is_rgb(grey_dir, trained_run, tmp_path):
    payload = ckpt.load_checkpoint(trained_run / "checkpoints" / "best.pt")
    del payload["config"]["image_channels"]  # as written before the key existed
    ckpt.save_checkpoint(tmp_path / "old.pt", payload)
    run_dir = sample(grey_dir, tmp_path / "old.pt", tmp_path)
    assert json.loads((run_dir / "config.json").read_text())["image_channels"] == 3
    assert png_modes(run_dir / "samples") == {"RGB"}
    with pytest.raises(ConfigError, match="key 'image_channels' is 1 but the checkpoint was trained with 3;"):
        sample(grey_dir, tmp_path / "old.pt", tmp_path, image_channels=1)


def test_the_reference_sdm_file_loads_as_a_3_channel_model():
    base, _ = config_from_dict("sample", {"data_dir": "unused", "model_path": str(PARITY_FIXTURE)})
    config, _, model, _ = load_sampling_model(base, set(), "config", torch.device("cpu"))
    assert config.image_channels == 3 and model.spec.in_channels == 3 and model.spec.out_channels == 6


def test_sample_image_channels_differing_from_the_checkpoint_is_a_config_error(grey_dir, grey_run, tmp_path):
    with pytest.raises(ConfigError, match=r"config: key 'image_channels' is 3 but the checkpoint was trained with 1; "
                                          r"remove the key or use the matching checkpoint$"):
        sample(grey_dir, grey_run, tmp_path, image_channels=3)


def test_sample_image_channels_auto_takes_the_checkpoints(grey_dir, grey_run, tmp_path):
    run_dir = sample(grey_dir, grey_run, tmp_path, image_channels="auto", num_samples=1)
    assert png_modes(run_dir / "samples") == {"L"}


def test_finetuning_an_rgb_checkpoint_on_grey_data_asks_for_image_channels_3(grey_dir, trained_run, tmp_path):
    config, _ = config_from_dict("finetune", tiny_train_config(grey_dir, tmp_path, resume_checkpoint=str(trained_run)))
    trainer = Trainer(config, "finetune", log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"is a model of 3-channel images but this run's image_channels is 1; "
                                          r"set image_channels to 3 to start from it$"):
        trainer.start_from(trained_run / "checkpoints" / "best.pt")

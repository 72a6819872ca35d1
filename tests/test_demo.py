"""The embedded demo dataset: layout, determinism, class content and refusal to overwrite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.data import index_dataset, load_image, load_mask
from guided_diffusion.demo import CLASSES, make_demo_dataset
from guided_diffusion.errors import ConfigError, DatasetError

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_train": 10, "num_test": 4, "image_size": 32}


def all_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def masks_of(root: Path) -> np.ndarray:
    """Every mask of the dataset stacked as N x H x W class ids."""
    return np.stack([load_mask(path, "multi-class") for path in sorted(root.glob("*/masks/*.png"))])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo dataset with default parameters, made once for this module."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")


def test_demo_has_the_folder_layout_counts_and_class_names(demo):
    assert len(list((demo / "train" / "images").glob("*.png"))) == 40
    assert len(list((demo / "train" / "masks").glob("*.png"))) == 40
    assert len(list((demo / "test" / "images").glob("*.png"))) == 12
    assert len(list((demo / "test" / "masks").glob("*.png"))) == 12
    assert json.loads((demo / "classes.json").read_text()) == {"classes": ["background", "scratch", "spot", "crack"]}
    assert Image.open(demo / "train" / "images" / "train_000.png").size == (64, 64)


def test_index_dataset_accepts_the_demo_with_four_classes(demo):
    index = index_dataset(demo, "multi-class", len(CLASSES))
    assert (len(index.train), len(index.test)) == (40, 12)


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = make_demo_dataset(tmp_path / "one", **SMALL, seed=7)
    second = make_demo_dataset(tmp_path / "two", **SMALL, seed=7)
    assert all_files(first) == all_files(second)


def test_other_seed_gives_other_images(tmp_path):
    first = make_demo_dataset(tmp_path / "one", **SMALL, seed=1)
    second = make_demo_dataset(tmp_path / "two", **SMALL, seed=2)
    image = "train/images/train_003.png"
    assert (first / image).read_bytes() != (second / image).read_bytes()


def test_every_class_appears_in_both_splits_with_cracks_rarest(demo):
    for split in ("train", "test"):
        masks = np.stack([load_mask(p, "multi-class") for p in sorted((demo / split / "masks").glob("*.png"))])
        assert set(np.unique(masks).tolist()) == {0, 1, 2, 3}
    images_with_class = (masks_of(demo)[:, None] == np.arange(4)[None, :, None, None]).any(axis=(2, 3)).sum(axis=0)
    assert images_with_class[3] < images_with_class[1] and images_with_class[3] < images_with_class[2]


def test_some_images_are_defect_free(demo):
    assert (masks_of(demo).max(axis=(1, 2)) == 0).sum() >= 2


def test_defect_classes_look_different_in_the_images(demo):
    pixels: dict[int, list[np.ndarray]] = {cls: [] for cls in range(4)}
    for mask_path in sorted(demo.glob("train/masks/*.png")):
        mask = load_mask(mask_path, "multi-class")
        image = load_image(mask_path.parent.parent / "images" / mask_path.name).astype(np.float64)
        for cls in range(4):
            pixels[cls].append(image[mask == cls])
    mean = {cls: np.concatenate(values).mean(axis=0) for cls, values in pixels.items()}
    background, scratch, spot, crack = (mean[cls].mean() for cls in range(4))
    assert scratch > background + 40  # bright lines
    assert crack < background - 60 and crack < spot  # near-black cracks
    assert mean[2][0] > mean[2][2] + 20  # rust-coloured spots: red above blue


def test_second_call_with_the_same_parameters_leaves_the_files_alone(tmp_path):
    out = make_demo_dataset(tmp_path / "demo", **SMALL)
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    assert make_demo_dataset(tmp_path / "demo", **SMALL) == out
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before


def test_folder_with_other_content_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match=r"mine: folder holds other content .*choose an empty or new folder"):
        make_demo_dataset(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_demo_made_with_other_parameters_is_not_overwritten(tmp_path):
    make_demo_dataset(tmp_path / "demo", **SMALL, seed=0)
    with pytest.raises(DatasetError, match=r"made with other parameters \(seed=0\)"):
        make_demo_dataset(tmp_path / "demo", **SMALL, seed=5)


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "demo").mkdir()
    assert len(index_dataset(make_demo_dataset(tmp_path / "demo", **SMALL), "multi-class", 4).train) == 10


def test_out_of_range_argument_is_named():
    with pytest.raises(ConfigError, match=r"image_size: must be an integer of at least 16, got 4"):
        make_demo_dataset("unused", image_size=4)


def test_command_line_writes_the_dataset(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "guided_diffusion.demo", str(tmp_path / "cli"), "--num-train", "3", "--num-test", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "cli" in result.stdout
    assert len(index_dataset(tmp_path / "cli", "multi-class", 4).train) == 3

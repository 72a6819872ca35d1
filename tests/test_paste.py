"""Copy-paste (`mode: "paste"`): real defect pixels copied exactly onto defect-free backgrounds, with no model;
placement that keeps every defect inside the image; the sample run layout; and magnetic tiles at 64 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from conftest import MAGNETIC_TILE, write_config
from guided_diffusion.config import config_from_dict
from guided_diffusion.data import Pair, SegmentationDataset, index_dataset, load_mask, split_train_val
from guided_diffusion.errors import ConfigError
from guided_diffusion.sampling.inpaint import Placement, choose_placement
from guided_diffusion.sampling.paste import paste_defects
from guided_diffusion.run_folder import to_uint8_image
from guided_diffusion.sampling.sample import run_sampling

NUM_CLASSES = 4
SIZE = 32  # the sampling image_size; the files are 40 x 48, so pasting must resize them as the dataset does
LAYOUT = ("images", "labels", "colored_labels", "samples")


# ---------------------------------------------------------------------------------------------------------------
# A tiny dataset: noise images (every pixel tells where it came from), masks of a few rectangles


def write_pair(folder: Path, stem: str, rng: np.random.Generator, boxes: list[tuple[int, int, int, int, int]]):
    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    for top, left, height, width, class_id in boxes:
        mask[top:top + height, left:left + width] = class_id
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


def make_dataset(root: Path, defect_free: int = 3) -> Path:
    """train/: 6 images with defects (some touching the border), `defect_free` all-background ones; test/: 2."""
    rng = np.random.default_rng(7)
    for split in ("train", "test"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
    defects = [[(2, 3, 6, 9, 1)], [(30, 40, 10, 8, 2), (5, 5, 3, 3, 3)], [(0, 0, 4, 48, 3)],
               [(12, 20, 15, 2, 1), (12, 22, 2, 10, 2)], [(20, 10, 8, 8, 2)], [(35, 0, 5, 5, 1)]]
    for k, boxes in enumerate(defects):
        write_pair(root / "train", f"defect{k}", rng, boxes)
    for k in range(defect_free):
        write_pair(root / "train", f"clean{k}", rng, [])
    for k in range(2):
        write_pair(root / "test", f"test{k}", rng, [(10 + k, 10, 5, 5, 1 + k)])
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("paste") / "tiny")


def paste_config(data_dir: Path, root: Path, **changes) -> dict:
    return {"data_dir": str(data_dir), "root_log_dir": str(root), "mode": "paste", "num_classes": NUM_CLASSES,
            "image_size": SIZE, "num_samples": 8, "mask_split": "train", **changes}


def paste(data_dir: Path, root: Path, log=lambda *_: None, **changes) -> Path:
    config, _ = config_from_dict("sample", paste_config(data_dir, root, **changes))
    return Path(run_sampling(config, log=log)["run_dir"])


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def moved(array: np.ndarray, flip_horizontal: bool, flip_vertical: bool, shift: tuple[int, int]) -> np.ndarray:
    """`array` flipped, then moved by `shift` with explicit indices (positions that fall outside are dropped;
    the uncovered ones are 0): the placement written out independently of inpaint.place_mask."""
    if flip_horizontal:
        array = np.flip(array, 1)
    if flip_vertical:
        array = np.flip(array, 0)
    out = np.zeros_like(array)
    height, width = array.shape[:2]
    rows, columns = np.mgrid[0:height, 0:width]
    inside = ((rows + shift[0] >= 0) & (rows + shift[0] < height)
              & (columns + shift[1] >= 0) & (columns + shift[1] < width))
    out[rows[inside] + shift[0], columns[inside] + shift[1]] = array[rows[inside], columns[inside]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The paste itself


@pytest.mark.parametrize("shape", [(16, 16, 3), (16, 16)], ids=["rgb", "grey"])
def test_pasted_pixels_are_the_source_defect_pixels_moved_exactly(shape):
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, shape, dtype=np.uint8)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros((16, 16), np.int64)
    mask[2:5, 3:7], mask[9, 1:4] = 2, 3
    placement = Placement(0, flip_horizontal=True, flip_vertical=False, shift=(4, -1))
    pasted, label = paste_defects(background, image, mask, placement)

    expected_label = moved(mask, True, False, (4, -1))
    where = expected_label != 0
    assert np.array_equal(label, expected_label) and where.sum() == (mask != 0).sum()
    assert np.array_equal(pasted[where], moved(image, True, False, (4, -1))[where])
    assert np.array_equal(pasted[~where], background[~where])
    assert pasted.dtype == np.uint8 and pasted.shape == shape and label.dtype == np.int64


def test_random_placement_never_puts_a_defect_pixel_outside_the_image():
    mask = np.zeros((20, 24), np.int64)
    mask[0:3, 2:10] = 1  # touches the top edge
    mask[10:14, 20:24] = 2  # touches the right edge
    mask[8, 5] = 3
    image = np.arange(20 * 24 * 3, dtype=np.int64).reshape(20, 24, 3).astype(np.uint8)
    background = np.zeros_like(image)
    counts = np.bincount(mask.ravel(), minlength=4)
    seen = set()
    for seed in range(300):
        placement = choose_placement(mask, 0, np.random.default_rng(seed), flip=True, move=True)
        _, label = paste_defects(background, image, mask, placement)
        assert np.array_equal(np.bincount(label.ravel(), minlength=4), counts), seed  # every component whole
        assert np.array_equal(label, moved(mask, placement.flip_horizontal, placement.flip_vertical,
                                            placement.shift)), seed  # moved, never wrapped around an edge
        seen.add((placement.flip_horizontal, placement.flip_vertical, placement.shift))
    assert len(seen) > 20


def test_a_small_defect_can_land_anywhere_its_box_fits():
    mask = np.zeros((6, 6), np.int64)
    mask[1:3, 2:4] = 1
    shifts = {choose_placement(mask, 0, np.random.default_rng(seed), flip=False, move=True).shift
              for seed in range(400)}
    assert shifts == {(dr, dc) for dr in range(-1, 4) for dc in range(-2, 3)}  # every 2x2 spot on a 6x6 grid


# ---------------------------------------------------------------------------------------------------------------
# Runs on the tiny dataset


def test_paste_run_writes_the_sample_layout_without_a_model(dataset, tmp_path):
    run_dir = paste(dataset, tmp_path)
    assert run_dir.parent == tmp_path and run_dir.name == "sample_001"
    names = {sub: sorted(pngs(run_dir / sub)) for sub in LAYOUT}
    assert len(names["samples"]) == 8 and all(names[sub] == names["samples"] for sub in LAYOUT)
    for name in ("grid.png", "legend.png", "config.json", "summary.json", "paste.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "paste" and summary["num_samples"] == 8
    assert summary["skipped_masks_without_defects"] == 3  # the clean tiles of train/
    config = json.loads((run_dir / "config.json").read_text())
    assert config["mode"] == "paste" and config["model_path"] == "" and "resolved_model_path" not in config
    sample = pngs(run_dir / "samples")[names["samples"][0]]
    assert sample.shape == (SIZE, SIZE, 3) and sample.dtype == np.uint8


def test_labels_and_images_are_the_source_defects_on_the_background_and_nothing_else(dataset, tmp_path):
    run_dir = paste(dataset, tmp_path, num_samples=12, mask_flip=True, mask_placement="random",
                    pairing="round-robin")
    train = index_dataset(dataset, "multi-class", NUM_CLASSES).train
    real = SegmentationDataset(train, SIZE, "multi-class")  # the dataset's own resize
    by_stem = {pair.stem: k for k, pair in enumerate(train)}
    by_image_name = {pair.image.name: k for k, pair in enumerate(train)}
    samples, backgrounds, labels = (pngs(run_dir / sub) for sub in ("samples", "images", "labels"))
    listing = json.loads((run_dir / "paste.json").read_text())
    assert len(listing) == len(samples) == 12
    for entry in listing:
        name = f"{entry['index']:05d}_{entry['mask']}.png"
        source = real[by_stem[entry["mask"]]]
        image, mask = to_uint8_image(source["image"]), source["mask"].numpy()
        background = to_uint8_image(real[by_image_name[entry["background"]]]["image"])
        place = (entry["flip_horizontal"], entry["flip_vertical"], tuple(entry["shift"]))
        expected = moved(mask, *place)
        pasted = expected != 0
        assert pasted.sum() == (mask != 0).sum(), name  # all defect pixels, none lost at an edge
        assert np.array_equal(labels[name], expected), name  # source classes where pasted, 0 elsewhere
        assert np.array_equal(samples[name][pasted], moved(image, *place)[pasted]), name
        assert np.array_equal(samples[name][~pasted], background[~pasted]), name
        assert np.array_equal(backgrounds[name], background), name  # images/ holds the background used
    assert {entry["background"] for entry in listing} == {"clean0.png", "clean1.png", "clean2.png"}


def test_image_i_depends_only_on_the_seed_and_i(dataset, tmp_path):
    options = {"mask_flip": True, "mask_placement": "random", "seed": 5}
    few = paste(dataset, tmp_path / "a", num_samples=4, batch_size=1, **options)
    many = paste(dataset, tmp_path / "b", num_samples=10, batch_size=8, **options)
    other_seed = paste(dataset, tmp_path / "c", num_samples=4, **{**options, "seed": 6})
    for sub in ("samples", "labels"):
        first, more, other = pngs(few / sub), pngs(many / sub), pngs(other_seed / sub)
        assert all(np.array_equal(image, more[name]) for name, image in first.items()), sub
        assert any(not np.array_equal(image, other[name]) for name, image in first.items()), sub


def test_the_val_split_is_recreated_from_the_configs_seed_and_val_fraction(dataset, tmp_path):
    run_dir = paste(dataset, tmp_path, mask_split="val", val_fraction=0.5, seed=3, num_samples=20)
    train = index_dataset(dataset, "multi-class", NUM_CLASSES).train
    _, val = split_train_val(train, 0.5, 3)
    with_defects = {pair.stem for pair in val if not pair.stem.startswith("clean")}
    used = {entry["mask"] for entry in json.loads((run_dir / "paste.json").read_text())}
    assert used == with_defects and with_defects
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_masks_without_defects"] == len(val) - len(with_defects)


def test_a_given_model_path_is_ignored_with_one_note(dataset, tmp_path):
    lines = []
    run_dir = paste(dataset, tmp_path, log=lines.append, model_path=str(tmp_path / "no-such-checkpoint.pt"))
    assert len(pngs(run_dir / "samples")) == 8
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "key 'model_path'" in notes[0] and "ignored with mode 'paste'" in notes[0]


def test_background_dir_replaces_the_datasets_defect_free_images(dataset, tmp_path):
    folder = tmp_path / "plates"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(np.full((36, 36), 60 + 100 * k, np.uint8)).save(folder / f"plate{k}.png")
    run_dir = paste(dataset, tmp_path / "runs", background_dir=str(folder))
    used = {entry["background"] for entry in json.loads((run_dir / "paste.json").read_text())}
    assert used <= {"plate0.png", "plate1.png"} and used
    for name, label in pngs(run_dir / "labels").items():
        background = pngs(run_dir / "images")[name]
        assert len(np.unique(background[label == 0])) == 1  # a flat plate outside the pasted pixels


def test_a_dataset_without_defect_free_images_is_one_error_and_writes_nothing(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "all-defects", defect_free=0)
    root = tmp_path / "runs"
    with pytest.raises(ConfigError, match="key 'mode' is 'paste', which needs defect-free images, but key "
                                          "'background_dir' is not set"):
        paste(dataset, root)
    assert not list(root.glob("sample_*"))

    status = main.main(["sample", "-c", str(write_config(tmp_path / "paste.json", paste_config(dataset, root)))])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1 and error[0].startswith("error: ")
    assert "needs defect-free images" in error[0] and "background_dir" in error[0]
    assert not list(root.glob("sample_*"))


@pytest.mark.parametrize("changes, message", [
    ({"model_path": ""}, None),
    ({"background_dir": "plates"}, None),
    ({"strength": 0.5}, "key 'strength' applies to mode 'variation', 'inpaint', 'harmonize', 'blend', but mode is "
                        "'paste'"),
    ({"mode": "noise"}, "key 'model_path' is required"),
])
def test_paste_config_keys(changes, message):
    values = {"data_dir": "d", "mode": "paste", **changes}
    if message is None:
        config, _ = config_from_dict("sample", values)
        assert config.mode == "paste"
    else:
        with pytest.raises(ConfigError, match=message):
            config_from_dict("sample", values)


# ---------------------------------------------------------------------------------------------------------------
# Magnetic tile, used in place


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason=f"{MAGNETIC_TILE} not found")
def test_magnetic_tile_defects_pasted_on_its_defect_free_tiles_at_64_px(tmp_path):
    config, _ = config_from_dict("sample", {"data_dir": str(MAGNETIC_TILE), "mode": "paste", "image_size": 64,
                                            "num_samples": 6, "mask_flip": True, "mask_placement": "random",
                                            "root_log_dir": str(tmp_path)})  # num_classes from classes.json
    run_dir = Path(run_sampling(config, log=lambda *_: None)["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["image_channels"] == 1  # grey tiles stay grey
    samples, backgrounds, labels = (pngs(run_dir / sub) for sub in ("samples", "images", "labels"))
    assert len(samples) == 6 and samples.keys() == backgrounds.keys() == labels.keys()
    train = MAGNETIC_TILE / "train"
    for entry in json.loads((run_dir / "paste.json").read_text()):
        name = f"{entry['index']:05d}_{entry['mask']}.png"
        label, sample = labels[name], samples[name]
        assert label.shape == (64, 64) and sample.shape == (64, 64) and label.max() < 6
        source_image = next((train / "images").glob(f"{entry['mask']}.*"))
        source = SegmentationDataset([Pair(entry["mask"], source_image, train / "masks" / f"{entry['mask']}.png")],
                                     64, "multi-class", image_channels=1)[0]
        place = (entry["flip_horizontal"], entry["flip_vertical"], tuple(entry["shift"]))
        expected = moved(source["mask"].numpy(), *place)
        assert np.array_equal(label, expected) and (label != 0).any(), name
        pasted = label != 0
        source_pixels = moved(to_uint8_image(source["image"], keep_gray=True), *place)
        assert np.array_equal(sample[pasted], source_pixels[pasted]), name
        assert np.array_equal(sample[~pasted], backgrounds[name][~pasted]), name
        background_mask = train / "masks" / f"{Path(entry['background']).stem}.png"
        assert not load_mask(background_mask, "multi-class").any(), entry  # a defect-free train tile

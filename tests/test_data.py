"""The folder dataset: pairing, validation messages, loading, splitting, resizing, tensors and one-hot."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.data import (
    DATASET_MODE_ALIASES,
    DatasetIndex,
    Pair,
    SegmentationDataset,
    canonical_dataset_mode,
    class_histogram,
    index_dataset,
    load_image,
    load_mask,
    one_hot,
    resize_pair,
    split_train_val,
)
from guided_diffusion.errors import ConfigError, DatasetError

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MAGNETIC_TILE = SHARED_DATASETS / "magnetic-tile"
MAGNETIC_TILE_BINARY = SHARED_DATASETS / "magnetic-tile-binary"
needs_real_data = pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="shared datasets not present")


# ---------------------------------------------------------------------------------------------------------------
# Helpers that build small datasets in tmp_path


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def stripes_mask(width: int, height: int, num_classes: int = 3) -> Image.Image:
    """An 8-bit mask of vertical stripes cycling through class ids 0..num_classes-1."""
    ids = (np.arange(width) * num_classes // width).astype(np.uint8)
    return Image.fromarray(np.tile(ids, (height, 1)))


def add_pair(
    root: Path,
    split: str,
    stem: str,
    size: tuple[int, int] = (12, 8),
    image_ext: str = ".png",
    mask: Image.Image | None = None,
    seed: int | None = None,
) -> None:
    """Write <root>/<split>/images/<stem><image_ext> and <root>/<split>/masks/<stem>.png."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    image_seed = seed if seed is not None else zlib.crc32(f"{split}/{stem}".encode())
    noise_image(*size, seed=image_seed).save(root / split / "images" / f"{stem}{image_ext}")
    (mask if mask is not None else stripes_mask(*size)).save(root / split / "masks" / f"{stem}.png")


def make_dataset(root: Path, train: tuple[str, ...] = ("a", "b", "c"), test: tuple[str, ...] = ("t1", "t2")) -> Path:
    """A valid multi-class (3 classes) dataset with the given stems; images get distinct content."""
    for index, stem in enumerate(train):
        add_pair(root, "train", stem, seed=index)
    for index, stem in enumerate(test):
        add_pair(root, "test", stem, seed=1000 + index)
    return root


def dataset_error(root: Path, dataset_mode: str = "multi-class", num_classes: int = 3, **kwargs) -> str:
    """The message of the DatasetError that index_dataset raises for root."""
    with pytest.raises(DatasetError) as caught:
        index_dataset(root, dataset_mode, num_classes, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def pairs_named(*stems: str) -> list[Pair]:
    """Pairs with the given stems and fake paths (for functions that do not read files)."""
    return [Pair(stem, Path(f"images/{stem}.png"), Path(f"masks/{stem}.png")) for stem in stems]


# ---------------------------------------------------------------------------------------------------------------
# Dataset modes


def test_dataset_mode_aliases_map_lemon_names_to_the_two_modes():
    assert canonical_dataset_mode("lemon-multi-class") == "multi-class"
    assert canonical_dataset_mode("lemon-binary") == "binary"
    assert set(DATASET_MODE_ALIASES.values()) == {"multi-class", "binary"}


def test_unknown_dataset_mode_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"dataset_mode: unknown value 'rgb'; use one of .*lemon-binary"):
        canonical_dataset_mode("rgb")


def test_binary_mode_requires_num_classes_two(tmp_path):
    make_dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"num_classes: must be 2 for dataset_mode binary, got 3"):
        index_dataset(tmp_path, "lemon-binary", 3)


# ---------------------------------------------------------------------------------------------------------------
# Indexing a valid dataset


def test_index_pairs_images_with_masks_sorted_by_stem(tmp_path):
    make_dataset(tmp_path, train=("c", "a", "b"), test=("t2", "t1"))
    index = index_dataset(tmp_path, "multi-class", 3)
    assert isinstance(index, DatasetIndex)
    assert [pair.stem for pair in index.train] == ["a", "b", "c"]
    assert [pair.stem for pair in index.test] == ["t1", "t2"]
    assert index.train[0].image == tmp_path / "train" / "images" / "a.png"
    assert index.train[0].mask == tmp_path / "train" / "masks" / "a.png"


def test_index_accepts_every_image_extension_in_any_case(tmp_path):
    extensions = [".jpg", ".JPEG", ".png", ".bmp", ".TIF", ".tiff"]
    for index, ext in enumerate(extensions):
        add_pair(tmp_path, "train", f"img{index}", image_ext=ext, seed=index)
    add_pair(tmp_path, "test", "t", seed=99)
    index = index_dataset(tmp_path, "multi-class", 3)
    assert [pair.image.suffix for pair in index.train] == extensions


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    make_dataset(tmp_path)
    for folder in ("train/images", "train/masks"):
        (tmp_path / folder / "Thumbs.db").write_bytes(b"junk")
        (tmp_path / folder / "notes.txt").write_text("labelled by hand")
        (tmp_path / folder / ".DS_Store").write_bytes(b"junk")
        (tmp_path / folder / "._a.png").write_bytes(b"macos resource fork")
    assert len(index_dataset(tmp_path, "multi-class", 3).train) == 3


def test_missing_test_folder_is_allowed_when_not_required(tmp_path):
    make_dataset(tmp_path, test=())
    index = index_dataset(tmp_path, "multi-class", 3, require_test=False)
    assert len(index.train) == 3 and index.test == []


def test_binary_mode_accepts_0_and_255_masks(tmp_path):
    binary = Image.fromarray(np.array([[0, 255, 255], [0, 0, 255]], dtype=np.uint8))
    add_pair(tmp_path, "train", "a", size=(3, 2), mask=binary, seed=1)
    add_pair(tmp_path, "test", "b", size=(3, 2), mask=binary, seed=2)
    index = index_dataset(tmp_path, "binary", 2)
    assert len(index.train) == 1 and len(index.test) == 1


# ---------------------------------------------------------------------------------------------------------------
# Validation: every problem named in a one-line message


def test_missing_data_dir_is_named(tmp_path):
    message = dataset_error(tmp_path / "nope")
    assert "nope" in message and "folder not found" in message


def test_missing_split_folders_are_listed(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    message = dataset_error(tmp_path)
    assert "train/masks" in message
    assert "test/images" in message and "test/masks" in message


def test_missing_test_folder_is_reported_when_required(tmp_path):
    make_dataset(tmp_path, test=())
    assert "test/images, test/masks" in dataset_error(tmp_path)


def test_empty_images_folder_is_reported(tmp_path):
    make_dataset(tmp_path)
    for file in (tmp_path / "test" / "images").iterdir():
        file.unlink()
    (tmp_path / "test" / "images" / "readme.txt").write_text("images go here")
    assert "test/images is empty" in dataset_error(tmp_path)


def test_images_without_masks_and_masks_without_images_are_named(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "train" / "masks" / "a.png").unlink()
    noise_image(12, 8).save(tmp_path / "train" / "images" / "z.jpg")
    stripes_mask(12, 8).save(tmp_path / "train" / "masks" / "orphan.png")
    message = dataset_error(tmp_path)
    assert "train: 2 images without a mask (a.png, z.jpg)" in message
    assert "train: 1 mask without an image (orphan.png)" in message


def test_long_lists_of_names_are_capped(tmp_path):
    make_dataset(tmp_path)
    for index in range(8):
        stripes_mask(12, 8).save(tmp_path / "test" / "masks" / f"m{index}.png")
    message = dataset_error(tmp_path)
    assert "test: 8 masks without an image (m0.png, m1.png, m2.png, m3.png, m4.png and 3 more)" in message


def test_two_images_with_the_same_stem_are_named(tmp_path):
    make_dataset(tmp_path)
    noise_image(12, 8, seed=5).save(tmp_path / "train" / "images" / "a.jpg")
    message = dataset_error(tmp_path)
    assert "train/images: 1 name used by several files (a.jpg and a.png)" in message
    assert "without a mask" not in message


def test_truncated_jpeg_is_reported(tmp_path):
    make_dataset(tmp_path)
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format="JPEG", quality=95)
    (tmp_path / "train" / "images" / "a.png").unlink()
    (tmp_path / "train" / "images" / "a.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "train/images/a.jpg: cannot be used (truncated file)" in dataset_error(tmp_path)


def test_truncated_png_mask_is_reported(tmp_path):
    make_dataset(tmp_path)
    mask_file = tmp_path / "train" / "masks" / "b.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 3, (64, 64), dtype=np.uint8)).save(mask_file)
    data = mask_file.read_bytes()
    mask_file.write_bytes(data[: len(data) * 2 // 3])
    assert "train/masks/b.png: cannot be used (" in dataset_error(tmp_path)


def test_file_that_is_not_an_image_is_reported(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "test" / "images" / "t1.png").write_text("not really a png")
    assert "test/images/t1.png: cannot be used (not an image or an unsupported format)" in dataset_error(tmp_path)


def test_mask_values_outside_the_classes_are_named_with_the_file(tmp_path):
    make_dataset(tmp_path)
    ids = np.zeros((8, 12), dtype=np.uint8)
    ids[0, :3] = [7, 9, 2]
    Image.fromarray(ids).save(tmp_path / "train" / "masks" / "c.png")
    message = dataset_error(tmp_path)
    assert "train/masks/c.png: values [7, 9] outside 0..2 (num_classes=3, dataset_mode multi-class)" in message


def test_many_masks_with_bad_values_are_grouped_per_split(tmp_path):
    make_dataset(tmp_path)
    for stem in ("a", "b"):
        Image.fromarray(np.full((8, 12), 4, dtype=np.uint8)).save(tmp_path / "train" / "masks" / f"{stem}.png")
    message = dataset_error(tmp_path)
    expected = "train: 2 masks with values outside 0..2 (num_classes=3, dataset_mode multi-class): a.png [4], b.png [4]"
    assert expected in message


def test_binary_mask_with_other_values_than_0_and_255_is_named(tmp_path):
    binary = Image.fromarray(np.array([[0, 255], [0, 255]], dtype=np.uint8))
    add_pair(tmp_path, "train", "a", size=(2, 2), mask=binary, seed=1)
    add_pair(tmp_path, "test", "b", size=(2, 2), mask=Image.fromarray(np.array([[0, 1], [128, 255]], np.uint8)), seed=2)
    message = dataset_error(tmp_path, "binary", 2)
    assert "test/masks/b.png: values [1, 128] outside {0, 255} (num_classes=2, dataset_mode binary)" in message


def test_255_in_multi_class_masks_suggests_ignore_index_for_void_and_binary_mode_for_0_255_masks(tmp_path):
    add_pair(tmp_path, "train", "a", size=(2, 2), mask=Image.fromarray(np.array([[0, 255], [0, 0]], np.uint8)), seed=1)
    add_pair(tmp_path, "test", "b", size=(2, 2), mask=Image.fromarray(np.zeros((2, 2), np.uint8)), seed=2)
    assert ("where 255 marks void pixels set ignore_index 255 (masks of 0 and 255 alone: dataset_mode binary)"
            in dataset_error(tmp_path, "multi-class", 2))


def test_mask_size_different_from_image_is_reported_with_both_sizes(tmp_path):
    make_dataset(tmp_path)
    stripes_mask(6, 4).save(tmp_path / "test" / "masks" / "t2.png")
    assert "test: image and mask sizes differ for t2 (12x8 vs 6x4)" in dataset_error(tmp_path)


def test_colour_mask_is_reported_with_the_conversion_hint(tmp_path):
    make_dataset(tmp_path)
    colour = np.zeros((8, 12, 3), dtype=np.uint8)
    colour[:, :6] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "train" / "masks" / "a.png")
    message = dataset_error(tmp_path)
    assert "train/masks/a.png: cannot be used (colour mask" in message
    assert "convert colour masks to class ids" in message


def test_jpeg_mask_is_reported_as_not_png(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "train" / "masks" / "b.png").unlink()
    stripes_mask(12, 8).save(tmp_path / "train" / "masks" / "b.jpg")
    message = dataset_error(tmp_path)
    assert "train/masks: 1 mask not .png (b.jpg)" in message
    assert "without a mask" not in message


def test_same_image_in_train_and_test_is_named_by_both_paths(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "test" / "images" / "t1.png").write_bytes((tmp_path / "train" / "images" / "b.png").read_bytes())
    message = dataset_error(tmp_path)
    assert "1 image in both train and test (train/images/b.png = test/images/t1.png)" in message


def test_all_problems_come_in_one_single_line_error_with_a_count(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "train" / "masks" / "a.png").unlink()
    Image.fromarray(np.full((8, 12), 7, dtype=np.uint8)).save(tmp_path / "train" / "masks" / "c.png")
    stripes_mask(6, 4).save(tmp_path / "test" / "masks" / "t1.png")
    message = dataset_error(tmp_path)
    assert message.startswith(f"dataset {tmp_path}: 3 problems: ")
    assert "a.png" in message and "c.png" in message and "t1 (12x8 vs 6x4)" in message


# ---------------------------------------------------------------------------------------------------------------
# Loading images and masks


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "RGB"])
def test_load_image_always_returns_uint8_rgb(tmp_path, mode):
    noise_image(7, 5).convert(mode).save(tmp_path / "image.png")
    image = load_image(tmp_path / "image.png")
    assert image.dtype == np.uint8 and image.shape == (5, 7, 3)


def test_load_image_scales_16_bit_gray_to_8_bit(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "image.png")
    assert load_image(tmp_path / "image.png")[0, :, 0].tolist() == [0, 128, 255]


def test_load_mask_reads_16_bit_class_ids(tmp_path):
    ids = np.array([[0, 300], [1000, 2]], dtype=np.uint16)
    Image.fromarray(ids).save(tmp_path / "m.png")
    loaded = load_mask(tmp_path / "m.png", "multi-class")
    assert loaded.dtype == np.int64 and loaded.tolist() == [[0, 300], [1000, 2]]


def test_load_mask_reads_palette_indices_not_colours(tmp_path):
    mask = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    mask.save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", "multi-class").tolist() == [[0, 1], [2, 1]]


def test_load_mask_reads_rgb_with_equal_channels_as_gray(tmp_path):
    ids = np.array([[0, 3], [1, 2]], dtype=np.uint8)
    Image.fromarray(np.stack([ids] * 3, axis=2)).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", "multi-class").tolist() == [[0, 3], [1, 2]]


def test_load_mask_maps_binary_255_to_class_1(tmp_path):
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", "lemon-binary").tolist() == [[0, 1]]


def test_load_mask_of_a_colour_mask_names_the_file(tmp_path):
    Image.fromarray(np.array([[[255, 0, 0]]], dtype=np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(DatasetError, match=r"colour\.png: colour mask .*convert colour masks to class ids"):
        load_mask(tmp_path / "colour.png", "multi-class")


# ---------------------------------------------------------------------------------------------------------------
# Train/val split


def test_split_takes_the_rounded_fraction_for_validation():
    train, val = split_train_val(pairs_named(*"abcdefghij"), 0.25, seed=0)
    assert len(val) == round(10 * 0.25) and len(train) == 10 - len(val)
    assert {p.stem for p in train} | {p.stem for p in val} == set("abcdefghij")


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    pairs = pairs_named(*[f"s{i:02d}" for i in range(30)])
    assert split_train_val(pairs, 0.2, seed=1) == split_train_val(pairs, 0.2, seed=1)
    assert split_train_val(pairs, 0.2, seed=1)[1] != split_train_val(pairs, 0.2, seed=2)[1]


def test_split_does_not_depend_on_the_order_of_the_pairs():
    pairs = pairs_named(*[f"s{i:02d}" for i in range(30)])
    assert split_train_val(pairs, 0.2, seed=3) == split_train_val(pairs[::-1], 0.2, seed=3)


def test_split_with_zero_fraction_keeps_everything_for_training():
    pairs = pairs_named("b", "a")
    assert split_train_val(pairs, 0.0, seed=0) == (pairs_named("a", "b"), [])


def test_split_of_small_lists_keeps_at_least_one_item_on_each_side():
    assert [len(part) for part in split_train_val(pairs_named("a", "b", "c"), 0.01, seed=0)] == [2, 1]
    assert [len(part) for part in split_train_val(pairs_named("a", "b"), 0.9, seed=0)] == [1, 1]
    assert [len(part) for part in split_train_val(pairs_named("a"), 0.5, seed=0)] == [1, 0]


def test_split_rejects_a_fraction_outside_0_to_1():
    with pytest.raises(ConfigError, match=r"val_fraction: must be a number in \[0, 1\), got 1\.5"):
        split_train_val(pairs_named("a", "b"), 1.5, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Resizing


def non_square_pair(height: int = 30, width: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """A smooth gradient image and a 3-class vertical stripes mask."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    mask = (np.arange(width)[None, :].repeat(height, 0) * 3 // width).astype(np.int64)
    return image, mask


@pytest.mark.parametrize("resize_mode", ["resize", "crop"])
def test_resize_modes_give_square_outputs_with_valid_class_ids(resize_mode):
    image, mask = non_square_pair()
    out_image, out_mask = resize_pair(image, mask, 16, resize_mode)
    assert out_image.shape == (16, 16, 3) and out_image.dtype == np.uint8
    assert out_mask.shape == (16, 16)
    assert set(np.unique(out_mask).tolist()) <= {0, 1, 2}


def test_resize_stretches_the_whole_image():
    image, mask = non_square_pair()
    _, out_mask = resize_pair(image, mask, 15, "resize")
    assert out_mask[0].tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_crop_keeps_the_aspect_ratio_and_takes_the_centre():
    image, mask = non_square_pair(height=30, width=60)
    out_image, out_mask = resize_pair(image, mask, 30, "crop")
    assert out_mask[0].tolist() == [0] * 5 + [1] * 20 + [2] * 5  # centre 30 of 60 columns: stripes at 20 and 40
    assert np.array_equal(out_image, image[:, 15:45])


def test_unknown_resize_mode_names_the_key():
    image, mask = non_square_pair()
    with pytest.raises(ConfigError, match=r"resize_mode: unknown value 'pad'"):
        resize_pair(image, mask, 16, "pad")


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def test_dataset_items_are_image_in_minus1_1_and_int64_mask(tmp_path):
    make_dataset(tmp_path)
    dataset = SegmentationDataset(index_dataset(tmp_path, "multi-class", 3).train, 16, "multi-class")
    item = dataset[1]
    assert len(dataset) == 3 and item["index"] == 1
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (16, 16)
    assert set(item["mask"].unique().tolist()) == {0, 1, 2}


def test_dataset_image_scaling_is_uint8_over_127_5_minus_1(tmp_path):
    add_pair(tmp_path, "train", "white", size=(4, 4))
    Image.new("RGB", (4, 4), (255, 0, 51)).save(tmp_path / "train" / "images" / "white.png")
    image = SegmentationDataset(pairs_from(tmp_path), 4, "multi-class")[0]["image"]
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))


def pairs_from(root: Path) -> list[Pair]:
    """Pairs of root's train split without validation (for tests with a train split only)."""
    return index_dataset(root, "multi-class", 3, require_test=False).train


def test_dataset_has_no_randomness_and_caches_items(tmp_path):
    make_dataset(tmp_path)
    dataset = SegmentationDataset(pairs_from(tmp_path), 8, "multi-class", resize_mode="crop")
    first = dataset[0]
    (tmp_path / "train" / "images" / "a.png").unlink()  # served from the cache now
    second = dataset[0]
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])


def test_loading_ahead_on_threads_fills_the_cache_with_the_arrays_a_step_would_load(tmp_path):
    for stem in "abcdef":
        add_pair(tmp_path, "train", stem, size=(40, 24))
    pairs = pairs_from(tmp_path)
    in_step = SegmentationDataset(pairs, 16, "multi-class")
    ahead = SegmentationDataset(pairs, 16, "multi-class")
    ahead.load_ahead([4, 2, 0, 1, 3, 5], threads=2)
    items = [ahead[i] for i in (4, 2, 0, 1, 3, 5)]  # each waits for its load when it is not done yet
    assert all(entry is not None for entry in ahead._cached) and not ahead._pending
    for item in items:
        expected = in_step[item["index"]]
        assert torch.equal(item["image"], expected["image"]) and torch.equal(item["mask"], expected["mask"])
    ahead.stop_loading()


def test_loads_cancelled_by_stop_loading_are_made_in_the_step_and_failures_surface_there(tmp_path):
    for stem in "abc":
        add_pair(tmp_path, "train", stem)
    pairs = pairs_from(tmp_path)
    dataset = SegmentationDataset(pairs, 8, "multi-class")
    dataset.load_ahead([0, 1, 2], threads=1)
    dataset.stop_loading()  # queued loads are cancelled; items still load, in the step
    assert [dataset[i]["index"] for i in range(3)] == [0, 1, 2]

    broken = SegmentationDataset(pairs, 8, "multi-class")
    (tmp_path / "train" / "images" / "b.png").write_bytes(b"not an image")
    broken.load_ahead([1], threads=1)
    with pytest.raises(Exception):
        broken[1]
    broken.stop_loading()


def test_without_cache_or_threads_nothing_is_loaded_ahead(tmp_path):
    make_dataset(tmp_path)
    pairs = pairs_from(tmp_path)
    for dataset, threads in ((SegmentationDataset(pairs, 8, "multi-class", cache=False), 2),
                             (SegmentationDataset(pairs, 8, "multi-class"), 0)):
        dataset.load_ahead([0, 1, 2], threads)
        assert dataset._pool is None and not dataset._pending


def test_binary_dataset_masks_are_0_and_1(tmp_path):
    binary = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    add_pair(tmp_path, "train", "a", size=(2, 2), mask=binary)
    pairs = index_dataset(tmp_path, "binary", 2, require_test=False).train
    assert SegmentationDataset(pairs, 2, "binary")[0]["mask"].tolist() == [[0, 1], [1, 0]]


def test_one_hot_has_one_channel_per_class_and_a_single_one_per_pixel():
    mask = torch.tensor([[[0, 2], [1, 2]]], dtype=torch.int64)
    encoded = one_hot(mask, 4)
    assert encoded.shape == (1, 4, 2, 2) and encoded.dtype == torch.float32
    assert torch.equal(encoded.sum(dim=1), torch.ones(1, 2, 2))
    assert torch.equal(encoded.argmax(dim=1), mask)
    assert encoded[0, 3].sum() == 0


def test_one_hot_gives_void_pixels_no_class_like_the_null_label():
    mask = torch.tensor([[[0, 255], [2, 255]]], dtype=torch.int64)
    encoded = one_hot(mask, 3, ignore_index=255)
    assert torch.equal(encoded.sum(dim=1), torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    assert torch.equal(encoded[0, :, 1, 0], torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(RuntimeError):  # any other id out of range is still an error
        one_hot(torch.tensor([[[0, 7]]]), 3, ignore_index=255)


def test_one_hot_rejects_a_mask_that_is_not_int64_nhw():
    with pytest.raises(ValueError, match="int64 NxHxW"):
        one_hot(torch.zeros(2, 2, dtype=torch.int64), 3)


def test_class_histogram_counts_pixels_per_class_at_native_size(tmp_path):
    make_dataset(tmp_path, train=("a", "b"))
    counts = class_histogram(pairs_from(tmp_path), "multi-class", 3)
    assert counts.tolist() == [2 * 8 * 4, 2 * 8 * 4, 2 * 8 * 4]  # 12 columns in 3 stripes of 4, 8 rows


# ---------------------------------------------------------------------------------------------------------------
# Real data: the Magnetic-tile dataset


@needs_real_data
def test_magnetic_tile_indexes_with_six_classes():
    index = index_dataset(MAGNETIC_TILE, "multi-class", 6)
    assert (len(index.train), len(index.test)) == (444, 148)


@needs_real_data
def test_magnetic_tile_binary_indexes_in_binary_mode():
    index = index_dataset(MAGNETIC_TILE_BINARY, "lemon-binary", 2)
    assert (len(index.train), len(index.test)) == (444, 148)


@needs_real_data
def test_magnetic_tile_grayscale_images_become_three_channels():
    pair = index_dataset(MAGNETIC_TILE, "multi-class", 6).train[0]
    assert Image.open(pair.image).mode == "L"
    image = load_image(pair.image)
    assert image.ndim == 3 and image.shape[2] == 3
    assert np.array_equal(image[:, :, 0], image[:, :, 2])


@needs_real_data
def test_magnetic_tile_binary_masks_load_as_0_and_1():
    pairs = index_dataset(MAGNETIC_TILE_BINARY, "binary", 2).train
    values = set()
    for pair in pairs[:20]:
        values |= set(np.unique(load_mask(pair.mask, "binary")).tolist())
    assert values == {0, 1}


@needs_real_data
def test_magnetic_tile_binary_in_multi_class_mode_is_rejected_with_a_hint():
    message = dataset_error(MAGNETIC_TILE_BINARY, "multi-class", 6)
    assert "masks with values outside 0..5" in message and "(masks of 0 and 255 alone: dataset_mode binary)" in message

"""Real and synthetic (image, mask) sets in memory, at the evaluation's common size.

Real pairs come from a dataset folder, checked by `guided_diffusion.data.index_dataset`. Synthetic pairs come
from a sample run folder written by `main.py sample`: `samples/<stem>.png` is the synthetic image and
`labels/<stem>.png` the class-id mask that conditioned it. A sample folder is checked as a whole before anything
is trained, and every problem is reported in one line: missing folders, unmatched names, a number of classes
that differs from the dataset's, label ids outside the dataset's classes, sample/label size mismatches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guided_diffusion.data import (Pair, canonical_dataset_mode, index_dataset, load_image, load_mask,
                                   read_class_names, resize_pair)
from guided_diffusion.errors import ConfigError, DatasetError
from guided_diffusion.run_folder import latest_run_dir

_MAX_LISTED = 4

IGNORE_INDEX = 255
"""The label value of 'ignore' in filtered synthetic labels: the losses and metrics skip such pixels."""
FILTERED_LABELS, FILTER_REPORT = "labels_filtered", "filter.json"
"""Written into a sample run folder by evaluation/filter.sh (evaluation/freemask.py): the labels with ignored
pixels, and the report that lists the images to drop."""


def _listed(items: Sequence[str]) -> str:
    """'a, b, c' capped at a few items, then 'and N more'."""
    text = ", ".join(items[:_MAX_LISTED])
    return text + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _workers() -> int:
    return min(8, (os.cpu_count() or 1) + 2)


@dataclass(frozen=True)
class ImageSet:
    """Images (uint8 N x S x S x 3) and class-id masks (N x S x S) of one source, in stem order."""

    name: str
    stems: tuple[str, ...]
    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.stems)

    def take(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The images and masks at `indices`."""
        index = np.asarray(indices, dtype=np.int64)
        return self.images[index], self.masks[index]


def concatenate(sets: Sequence[ImageSet], name: str) -> ImageSet:
    """One set holding the pairs of several (stems prefixed with their set's name so they stay unique)."""
    if not sets:
        raise ValueError("no image sets to concatenate")
    stems = tuple(f"{s.name}/{stem}" for s in sets for stem in s.stems)
    return ImageSet(name, stems, np.concatenate([s.images for s in sets]), np.concatenate([s.masks for s in sets]))


def training_set(parts: Sequence[tuple[ImageSet, Sequence[int] | None]]) -> tuple[np.ndarray, np.ndarray]:
    """The images and masks a segmenter trains on: of each (set, indices) part, in order, the pairs at `indices`
    (all of them with None). evaluate.sh's mixes and the study's variants are put together by it."""
    taken = [(part.images, part.masks) if indices is None else part.take(indices) for part, indices in parts]
    return np.concatenate([images for images, _ in taken]), np.concatenate([masks for _, masks in taken])


def _compact(mask: np.ndarray) -> np.ndarray:
    """uint8 class ids when they fit (a quarter of the memory of int64 masks kept for a whole run)."""
    return mask.astype(np.uint8) if mask.size == 0 or int(mask.max()) < 256 else mask.astype(np.int32)


def load_pairs(pairs: Sequence[Pair], dataset_mode: str, image_size: int, resize_mode: str, name: str) -> ImageSet:
    """Load and resize pairs of (image file, mask file) into an ImageSet (masks read per `dataset_mode`)."""

    def load(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        image, mask = resize_pair(load_image(pair.image), load_mask(pair.mask, dataset_mode), image_size, resize_mode)
        return image, _compact(mask)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        loaded = list(pool.map(load, pairs))
    images = np.stack([image for image, _ in loaded]) if loaded else np.empty((0, image_size, image_size, 3), np.uint8)
    masks = np.stack([mask for _, mask in loaded]) if loaded else np.empty((0, image_size, image_size), np.uint8)
    return ImageSet(name, tuple(pair.stem for pair in pairs), images, masks)


# ---------------------------------------------------------------------------------------------------------------
# The real dataset


def link_subset(pairs: Sequence[Pair], folder: Path, data_dir: str | os.PathLike) -> Path:
    """`pairs` as a dataset folder of symbolic links (train/ only), with `data_dir`'s classes.json. Links of an
    earlier call that `pairs` no longer hold are removed, so `folder` must be the caller's own."""
    for kind, attribute in (("images", "image"), ("masks", "mask")):
        target = folder / "train" / kind
        target.mkdir(parents=True, exist_ok=True)
        wanted = {getattr(p, attribute).name: getattr(p, attribute) for p in pairs}
        for existing in target.iterdir():
            if existing.name not in wanted:
                existing.unlink()
        for name, source in wanted.items():
            link = target / name
            if not link.is_symlink():
                try:
                    link.symlink_to(Path(os.path.abspath(source)))
                except FileExistsError:  # made meanwhile by another process of the study (its Slurm jobs)
                    pass
    classes = Path(data_dir) / "classes.json"
    if classes.is_file():
        shutil.copyfile(classes, folder / "classes.json")
    return folder


def class_names(data_dir: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names from `<data_dir>/classes.json` (data.read_class_names), else class_0, class_1, ..., made safe
    for CSV column names (letters, digits, '_' and '-'). A classes.json that lists another number of classes
    than `num_classes` is an error: one of the two is wrong."""
    names = read_class_names(data_dir, num_classes)
    safe = [re.sub(r"[^A-Za-z0-9_-]+", "_", n).strip("_") or f"class_{i}" for i, n in enumerate(names)]
    return [name if safe.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(safe)]


def num_classes_from_classes_json(data_dir: str | os.PathLike) -> int | None:
    """The length of the "classes" list in `<data_dir>/classes.json`, or None when there is no usable file."""
    path = Path(data_dir) / "classes.json"
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("classes")
    except (OSError, json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    return len(names) if isinstance(names, list) and len(names) >= 2 else None


def infer_num_classes(num_classes: int | None, dataset_mode: str, data_dir: str | os.PathLike,
                      sample_dirs: Sequence[str | os.PathLike], name: str) -> int:
    """`num_classes` when given, else binary -> 2, else the dataset's classes.json, else the first sample folder's
    config.json; `name` is how the user sets it (a config key or an option) for the error message."""
    if num_classes is not None:
        return num_classes
    if canonical_dataset_mode(dataset_mode) == "binary":
        return 2
    from_json = num_classes_from_classes_json(data_dir)
    if from_json is not None:
        return from_json
    for path in sample_dirs:
        recorded = recorded_num_classes(resolve_sample_dir(path))
        if recorded is not None:
            return recorded
    raise ConfigError(f"{name} is required: the dataset has no classes.json and no sample folder's config.json "
                      f"records it")


def resolve_num_classes(config, sample_dirs: Sequence[str | os.PathLike] = ()) -> int:
    """The number of classes of a config with the keys num_classes, dataset_mode and data_dir (evaluate.sh's, the
    study's): key num_classes, else binary -> 2, else classes.json, else the first of `sample_dirs`' config.json."""
    return infer_num_classes(config.num_classes, config.dataset_mode, config.data_dir, sample_dirs,
                             "key 'num_classes'")


def check_label_keys(background_class: int | None, ignore_index: int | None, num_classes: int) -> None:
    """ConfigError when key background_class is no class id, or key ignore_index is one (checked once the number
    of classes is known)."""
    if background_class is not None and background_class >= num_classes:
        raise ConfigError(f"key 'background_class' is {background_class} but the dataset has {num_classes} classes "
                          f"(ids 0..{num_classes - 1}); use null when no class is background")
    if ignore_index is not None and ignore_index < num_classes:
        raise ConfigError(f"key 'ignore_index' {ignore_index} is a class id (0..{num_classes - 1}); use a value no "
                          "class uses, such as 255")


def load_real_dataset(
    data_dir: str | os.PathLike, dataset_mode: str, num_classes: int, image_size: int, resize_mode: str
) -> tuple[ImageSet, ImageSet]:
    """The checked train and test splits of a dataset folder, resized to image_size (masks as class ids)."""
    index = index_dataset(data_dir, dataset_mode, num_classes, require_test=True)
    train = load_pairs(index.train, dataset_mode, image_size, resize_mode, "train")
    test = load_pairs(index.test, dataset_mode, image_size, resize_mode, "test")
    return train, test


# ---------------------------------------------------------------------------------------------------------------
# Sample run folders


@dataclass(frozen=True)
class SampleFolder:
    """A sample run folder's synthetic pairs: Pair.image = samples/<stem>.png, Pair.mask = labels/<stem>.png."""

    path: Path
    pairs: tuple[Pair, ...]
    num_classes: int | None  # from its config.json, when it has one
    data_dir: str | None
    ignore_index: int | None = None  # IGNORE_INDEX for filtered labels; raw: the sample config's void value
    dropped: int = 0  # images the filter dropped (filtered labels only)

    @property
    def name(self) -> str:
        return self.path.name


def resolve_sample_dir(path: str | os.PathLike) -> Path:
    """A sample run folder as given, or the newest `sample_NNN` inside a folder of runs (e.g. Results/demo)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"sample folder {path}: not found")
    if (folder / "samples").is_dir() or (folder / "labels").is_dir():
        return folder
    newest = latest_run_dir(folder, "sample")
    if newest is None:
        raise DatasetError(f"sample folder {path}: has no samples/ and labels/ (expected a run folder written by "
                           "`main.py sample`, or a folder holding sample_NNN runs)")
    return newest


def _read_sample_config(folder: Path) -> dict:
    """A sample folder's config.json as a dict ({} when it has none)."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DatasetError(f"{path}: not valid JSON") from None
    return config if isinstance(config, dict) else {}


def recorded_num_classes(folder: Path) -> int | None:
    """The num_classes a sample folder's config.json records, or None."""
    value = _read_sample_config(folder).get("num_classes")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pngs(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png" and not p.name.startswith(".")}


def index_sample_folder(path: str | os.PathLike, num_classes: int, synthetic_labels: str = "raw") -> SampleFolder:
    """List and pair a sample folder's samples/ and labels/, and check its config.json against the dataset.

    With synthetic_labels "filtered" the masks are labels_filtered/ (255 = ignore) and the images filter.json drops are
    left out."""
    folder = resolve_sample_dir(path)
    where = f"sample folder {folder}"
    missing = [name for name in ("samples", "labels") if not (folder / name).is_dir()]
    if missing:
        raise DatasetError(f"{where}: {' and '.join(missing)}/ missing (expected the output of `main.py sample`)")
    sampled_classes = recorded_num_classes(folder)
    if sampled_classes is not None and sampled_classes != num_classes:
        raise DatasetError(f"{where}: sampled with num_classes {sampled_classes} (its config.json) but the dataset "
                           f"has {num_classes} classes; evaluate samples with the dataset their model learned")

    samples, labels = _pngs(folder / "samples"), _pngs(folder / "labels")
    problems = []
    if not samples:
        problems.append("samples/ holds no .png files")
    lonely_samples = sorted(set(samples) - set(labels))
    lonely_labels = sorted(set(labels) - set(samples))
    if lonely_samples:
        problems.append(f"{len(lonely_samples)} samples without a label ({_listed(lonely_samples)})")
    if lonely_labels:
        problems.append(f"{len(lonely_labels)} labels without a sample ({_listed(lonely_labels)})")
    if problems:
        raise DatasetError(f"{where}: " + "; ".join(problems))
    recorded = _read_sample_config(folder)
    data_dir = recorded.get("data_dir")
    data_dir = data_dir if isinstance(data_dir, str) else None
    if synthetic_labels == "filtered":
        return _filtered_folder(folder, sorted(samples), samples, sampled_classes, data_dir)
    pairs = tuple(Pair(stem, samples[stem], labels[stem]) for stem in sorted(samples))
    void = recorded.get("ignore_index")  # labels/ keep the void value sampling was given
    return SampleFolder(folder, pairs, sampled_classes, data_dir, void if isinstance(void, int) else None)


def _filtered_folder(folder: Path, stems: list[str], samples: dict[str, Path], sampled_classes: int | None,
                     data_dir: str | None) -> SampleFolder:
    """The pairs of a filtered sample folder: labels_filtered/ masks, less the images filter.json drops."""
    where = f"sample folder {folder}"
    report_path, labels_dir = folder / FILTER_REPORT, folder / FILTERED_LABELS
    if not report_path.is_file() or not labels_dir.is_dir():
        raise DatasetError(f"{where}: no {FILTERED_LABELS}/ and {FILTER_REPORT} (synthetic_labels is 'filtered'); "
                           f"filter it first: evaluation/filter.sh --data-dir <dataset> --samples {folder}")
    try:
        dropped = json.loads(report_path.read_text(encoding="utf-8"))["dropped"]
    except (ValueError, KeyError, TypeError):
        raise DatasetError(f"{report_path}: not a filter report with a \"dropped\" list") from None
    if not isinstance(dropped, list):
        raise DatasetError(f"{report_path}: \"dropped\" must be a list of sample stems")
    filtered = _pngs(labels_dir)
    dropped_stems = set(dropped)
    kept = [stem for stem in stems if stem not in dropped_stems]
    missing = [stem for stem in kept if stem not in filtered]
    if missing:
        raise DatasetError(f"{where}: {len(missing)} samples without a filtered label in {FILTERED_LABELS}/ "
                           f"({_listed(missing)}); filter the folder again")
    if not kept:
        raise DatasetError(f"{where}: the filter dropped all {len(stems)} images; nothing is left to train on")
    pairs = tuple(Pair(stem, samples[stem], filtered[stem]) for stem in kept)
    return SampleFolder(folder, pairs, sampled_classes, data_dir, IGNORE_INDEX, len(stems) - len(kept))


def load_sample_folder(folder: SampleFolder, num_classes: int, image_size: int, resize_mode: str) -> ImageSet:
    """Decode every synthetic pair, check label ids and sizes (all problems in one error), resize to image_size."""
    where = f"sample folder {folder.path}"

    def load(pair: Pair) -> tuple[np.ndarray, np.ndarray] | str:
        try:
            image = load_image(pair.image)
            mask = load_mask(pair.mask, "multi-class")  # labels/ holds class ids in every dataset mode
        except DatasetError as error:
            return str(error).replace(str(folder.path) + os.sep, "")
        if image.shape[:2] != mask.shape:
            return (f"{pair.stem}: sample {image.shape[1]}x{image.shape[0]} but label "
                    f"{mask.shape[1]}x{mask.shape[0]}")
        bad = sorted(int(v) for v in np.unique(mask) if v >= num_classes and v != folder.ignore_index)
        if bad:
            return (f"{pair.mask.parent.name}/{pair.mask.name}: class ids {bad[:8]} outside the dataset's "
                    f"0..{num_classes - 1}")
        resized_image, resized_mask = resize_pair(image, mask, image_size, resize_mode)
        return resized_image, _compact(resized_mask)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        loaded = list(pool.map(load, folder.pairs))
    problems = [item for item in loaded if isinstance(item, str)]
    if problems:
        raise DatasetError(f"{where}: {len(problems)} unusable pairs: {_listed(problems)}")
    images = np.stack([image for image, _ in loaded])
    masks = np.stack([mask for _, mask in loaded])
    return ImageSet(folder.name, tuple(pair.stem for pair in folder.pairs), images, masks)

"""Folder dataset: pairing, validation, loading, resize/crop and the one-hot map.

Layout of a dataset folder::

    <data_dir>/train/images/<stem>.<jpg|jpeg|png|bmp|tif|tiff>
    <data_dir>/train/masks/<stem>.png        one class id per pixel
    <data_dir>/test/images/...  and  <data_dir>/test/masks/...

`index_dataset` checks the whole folder before any training starts and reports every problem it finds in a
single one-line `DatasetError`. The other functions assume an indexed (valid) dataset.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, DatasetError

DATASET_MODE_ALIASES: dict[str, str] = {
    "multi-class": "multi-class",
    "lemon-multi-class": "multi-class",
    "binary": "binary",
    "lemon-binary": "binary",
}
"""Accepted `dataset_mode` values (ISDM names included) and the mode each one means."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTENSION = ".png"
RESIZE_MODES = ("resize", "crop")
SPLITS = ("train", "test")

_BINARY_VALUES = (0, 255)
_MAX_LISTED = 5  # names listed per problem before "and N more"


# ---------------------------------------------------------------------------------------------------------------
# Modes and records


def canonical_dataset_mode(name: str) -> str:
    """Return the canonical mode ('multi-class' or 'binary') for a `dataset_mode` value or alias."""
    mode = DATASET_MODE_ALIASES.get(name) if isinstance(name, str) else None
    if mode is None:
        choices = ", ".join(sorted(DATASET_MODE_ALIASES))
        raise ConfigError(f"dataset_mode: unknown value {name!r}; use one of {choices}")
    return mode


@dataclass(frozen=True)
class Pair:
    """One training example: an image file and its mask file sharing the file-name stem."""

    stem: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class DatasetIndex:
    """The validated pairs of a dataset folder; each split sorted by stem."""

    data_dir: Path
    train: list[Pair]
    test: list[Pair]


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def _decode(data: bytes) -> Image.Image:
    """Decode image bytes completely (so truncated files fail here, not later)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _read(path: Path) -> Image.Image:
    """Open and fully decode an image file; raise DatasetError naming the file when it cannot be read."""
    try:
        return _decode(Path(path).read_bytes())
    except Exception as error:  # any decoder failure on a user file is a data problem
        raise DatasetError(f"{path}: cannot be read ({_describe_read_error(error)})") from error


def _describe_read_error(error: Exception) -> str:
    """A short, path-free reason for a failed decode."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image or an unsupported format"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "truncated" in text.lower():
        return "truncated file"
    return text[:80]


def _image_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any PIL image (gray, 16-bit, RGBA, palette, CMYK, ...) to a uint8 HxWx3 array."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 16-bit range to 8-bit
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
"""PIL modes that hold one grey value per pixel (LA's alpha is dropped on loading, as for RGBA)."""


def _image_to_gray(image: Image.Image) -> np.ndarray:
    """Convert any PIL image to a uint8 HxW array: grey images keep their values (16-bit scaled to 8-bit as
    `_image_to_rgb` does), colour images become their luma (ITU-R 601, PIL's "L"), which equals the value of
    an RGB image whose three channels are equal."""
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    return np.asarray(Image.fromarray(_image_to_rgb(image)).convert("L"), dtype=np.uint8).copy()


def is_grayscale(image: Image.Image) -> bool:
    """Whether a decoded image is grey: a grey PIL mode, or a colour mode whose R, G and B are equal everywhere."""
    if image.mode in GRAYSCALE_MODES:
        return True
    rgb = _image_to_rgb(image)
    return bool(np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]))


def _is_grayscale_file(path: Path) -> bool:
    """`is_grayscale` of an image file; a grey mode is read from the header alone, without decoding pixels."""
    with Image.open(path) as image:
        if image.mode in GRAYSCALE_MODES:
            return True
        image.load()
        return is_grayscale(image)


def first_colour_image(paths: list[Path]) -> Path | None:
    """The first of `paths` (in order) that is not grayscale (see `is_grayscale`), or None when all are grey.

    Cheap on grey datasets stored in a grey mode (headers only) and on colour datasets (it stops at the first
    colour file found); only grey images stored as RGB are decoded in full. Files must be readable (indexed)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
        for start in range(0, len(paths), 64):  # in chunks, so a colour dataset stops after its first chunk
            chunk = paths[start:start + 64]
            for path, grey in zip(chunk, pool.map(_is_grayscale_file, chunk)):
                if not grey:
                    return path
    return None


def _mask_ids(image: Image.Image) -> np.ndarray:
    """Raw class ids of a decoded mask as an integer HxW array (values not yet checked or mapped).

    Raises ValueError with a user-facing reason when the mask is not a class-id image.
    """
    mode = image.mode
    if mode in ("L", "P"):  # 8-bit gray, or palette indices
        return np.asarray(image, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.asarray(image).astype(np.int64)
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode in ("RGB", "RGBA", "LA"):
        channels = np.asarray(image)
        if mode == "LA":
            return channels[:, :, 0].copy()
        rgb = channels[:, :, :3]
        if not (np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])):
            raise ValueError(
                f"colour mask ({mode} with differing channels); convert colour masks to class ids "
                "(one id per pixel, 8- or 16-bit grayscale png)"
            )
        return rgb[:, :, 0].copy()
    raise ValueError(f"unsupported mask mode {mode}; save masks as 8- or 16-bit grayscale png of class ids")


def _distinct_values(ids: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer array (fast path for 8-bit masks)."""
    if ids.dtype == np.uint8:
        return np.flatnonzero(np.bincount(ids.ravel(), minlength=256)).tolist()
    return np.unique(ids).tolist()


def _bad_values(values: list[int], dataset_mode: str, num_classes: int) -> list[int]:
    """The raw mask values that are not allowed in this mode."""
    if dataset_mode == "binary":
        return [v for v in values if v not in _BINARY_VALUES]
    return [v for v in values if v < 0 or v >= num_classes]


def load_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Load an image file as uint8 HxWx3 RGB, or with `channels` 1 as uint8 HxW grey (gray, 16-bit, RGBA and
    palette images are converted; a colour image becomes its luma).

    EXIF orientation is ignored on purpose: masks are drawn on the stored pixel grid.
    """
    if channels not in (1, 3):
        raise ValueError(f"load_image: channels must be 1 or 3, got {channels!r}")
    image = _read(Path(path))
    return _image_to_gray(image) if channels == 1 else _image_to_rgb(image)


def load_mask(path: str | os.PathLike, dataset_mode: str) -> np.ndarray:
    """Load a mask png as int64 HxW class ids; in binary mode 0 -> 0 and 255 -> 1."""
    mode = canonical_dataset_mode(dataset_mode)
    try:
        ids = _mask_ids(_read(Path(path))).astype(np.int64)
    except ValueError as error:
        raise DatasetError(f"{path}: {error}") from error
    if mode == "binary":
        bad = _bad_values(_distinct_values(ids), mode, 2)
        if bad:
            raise DatasetError(f"{path}: values {_list_values(bad)} in a binary mask; use only 0 and 255")
        ids = (ids == 255).astype(np.int64)
    return ids


CLASSES_FILE = "classes.json"
"""The file beside train/ and test/ that names the classes: {"classes": ["background", "crack", ...]}."""


def read_class_names(data_dir: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """The class names of a dataset (index = class id) for logs, plots and colour legends.

    Read from `<data_dir>/classes.json` (or from `data_dir` itself when it names a .json file), a JSON object whose
    "classes" list names class 0, 1, ... (other keys are ignored, so the file may also hold statistics). Without
    the file every class is called `class_<i>`, which needs `num_classes`. When both the file and `num_classes`
    are there they must agree, because a name list of the wrong length would label the wrong class in a legend.
    """
    import json  # local: the only JSON this module reads

    path = Path(data_dir)
    if path.suffix.lower() != ".json":
        path = path / CLASSES_FILE
    if not path.is_file():
        if num_classes is None:
            raise ValueError(f"read_class_names: {path} is missing and num_classes was not given")
        return [f"class_{i}" for i in range(num_classes)]
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot be read ({_describe_read_error(error)})") from None
    names = content.get("classes") if isinstance(content, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise DatasetError(f'{path}: expected a JSON object with a "classes" list of non-empty names, '
                           f'e.g. {{"classes": ["background", "crack"]}}')
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(f"{path}: class names {repeated} appear more than once; give each class its own name")
    if num_classes is not None and len(names) != num_classes:
        raise DatasetError(f"{path}: lists {len(names)} class names but num_classes is {num_classes}; "
                           "name every class once, background (class 0) first")
    return names


# ---------------------------------------------------------------------------------------------------------------
# Indexing and validation


def _list_names(names: list[str]) -> str:
    """'a, b, c' capped at _MAX_LISTED names, then 'and N more'."""
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f" and {len(names) - _MAX_LISTED} more"
    return shown


def _list_values(values: list[int], cap: int = 8) -> str:
    """'[7, 9]' capped at `cap` values."""
    text = ", ".join(str(v) for v in values[:cap])
    if len(values) > cap:
        text += f", ... {len(values) - cap} more"
    return f"[{text}]"


def _plural(count: int, word: str) -> str:
    """'1 image' / '2 images'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _list_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible files of a folder split into (image-like files, everything else); hidden files are skipped."""
    wanted, other = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        (wanted if entry.suffix.lower() in IMAGE_EXTENSIONS else other).append(entry)
    return wanted, other


def _by_stem(files: list[Path]) -> tuple[dict[str, Path], list[list[Path]]]:
    """Map stem -> file, and the groups of files sharing a stem (those stems are left out of the map)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        groups[path.stem].append(path)
    unique = {stem: paths[0] for stem, paths in groups.items() if len(paths) == 1}
    clashes = [paths for paths in groups.values() if len(paths) > 1]
    return unique, clashes


@dataclass(frozen=True)
class _FileCheck:
    """What decoding one pair found."""

    pair: Pair
    image_hash: str | None
    image_size: tuple[int, int] | None  # (width, height)
    mask_size: tuple[int, int] | None
    unreadable: tuple[tuple[Path, str], ...]  # (file, reason)
    bad_values: tuple[int, ...]


def _check_pair(pair: Pair, dataset_mode: str, num_classes: int, ignore_value: int | None = None) -> _FileCheck:
    """Decode the image and mask of a pair completely and record every problem found."""
    unreadable: list[tuple[Path, str]] = []
    image_hash = image_size = mask_size = None
    bad: list[int] = []
    try:
        data = pair.image.read_bytes()
        image_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
        image_size = _decode(data).size
    except Exception as error:  # any decoder failure on a user file is a data problem
        unreadable.append((pair.image, _describe_read_error(error)))
    try:
        mask = _decode(pair.mask.read_bytes())
        mask_size = mask.size
    except Exception as error:  # any decoder failure on a user file is a data problem
        unreadable.append((pair.mask, _describe_read_error(error)))
    else:
        try:
            bad = [v for v in _bad_values(_distinct_values(_mask_ids(mask)), dataset_mode, num_classes)
                   if v != ignore_value]
        except ValueError as error:  # not a class-id mask; the message says why
            unreadable.append((pair.mask, str(error)))
    return _FileCheck(pair, image_hash, image_size, mask_size, tuple(unreadable), tuple(bad))


def _scan_split(root: Path, split: str, problems: list[str]) -> list[Pair]:
    """List a split's folders, match images to masks by stem and append listing problems; return the pairs."""
    folders = {kind: root / split / kind for kind in ("images", "masks")}
    missing = [f"{split}/{kind}" for kind, folder in folders.items() if not folder.is_dir()]
    if missing:
        problems.append(f"{_plural(len(missing), 'folder')} missing ({', '.join(missing)})")
        return []

    images, _ = _list_folder(folders["images"])
    mask_like, _ = _list_folder(folders["masks"])
    if not images:
        problems.append(f"{split}/images is empty (no {'/'.join(IMAGE_EXTENSIONS)} files)")
    if not mask_like:
        problems.append(f"{split}/masks is empty (no .png files)")
    if not images or not mask_like:
        return []

    masks = [path for path in mask_like if path.suffix.lower() == MASK_EXTENSION]
    not_png = [path for path in mask_like if path.suffix.lower() != MASK_EXTENSION]
    if not_png:
        problems.append(
            f"{split}/masks: {_plural(len(not_png), 'mask')} not .png ({_list_names([p.name for p in not_png])}); "
            "save masks as lossless png"
        )
    image_by_stem, image_clashes = _by_stem(images)
    mask_by_stem, mask_clashes = _by_stem(masks)
    for kind, clashes in (("images", image_clashes), ("masks", mask_clashes)):
        if clashes:
            names = [" and ".join(p.name for p in group) for group in clashes]
            problems.append(
                f"{split}/{kind}: {_plural(len(clashes), 'name')} used by several files ({_list_names(names)}); "
                "keep one file per name"
            )

    # stems already reported (clashes, non-png masks) are not reported again as unmatched
    reported = {p.stem for group in image_clashes + mask_clashes for p in group} | {p.stem for p in not_png}
    lonely_images = [p.name for s, p in image_by_stem.items() if s not in mask_by_stem and s not in reported]
    lonely_masks = [p.name for s, p in mask_by_stem.items() if s not in image_by_stem and s not in reported]
    if lonely_images:
        names = _list_names(lonely_images)
        problems.append(f"{split}: {_plural(len(lonely_images), 'image')} without a mask ({names})")
    if lonely_masks:
        names = _list_names(lonely_masks)
        problems.append(f"{split}: {_plural(len(lonely_masks), 'mask')} without an image ({names})")

    stems = sorted(set(image_by_stem) & set(mask_by_stem))
    return [Pair(stem, image_by_stem[stem], mask_by_stem[stem]) for stem in stems]


def _size(size: tuple[int, int]) -> str:
    """'640x480' from a PIL (width, height)."""
    return f"{size[0]}x{size[1]}"


def _file_problems(
    root: Path, split: str, checks: list[_FileCheck], dataset_mode: str, num_classes: int
) -> list[str]:
    """Problems found by decoding a split's files, one entry per kind of problem."""
    problems = []

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    unreadable = [(rel(path), reason) for check in checks for path, reason in check.unreadable]
    if len(unreadable) == 1:
        problems.append(f"{unreadable[0][0]}: cannot be used ({unreadable[0][1]})")
    elif unreadable:
        items = [f"{name} ({reason})" for name, reason in unreadable]
        problems.append(f"{split}: {len(unreadable)} files cannot be used: {_list_names(items)}")

    bad_values = [(rel(c.pair.mask), list(c.bad_values)) for c in checks if c.bad_values]
    allowed = "{0, 255}" if dataset_mode == "binary" else f"0..{num_classes - 1}"
    setting = f"num_classes={num_classes}, dataset_mode {dataset_mode}"
    all_bad = {value for _, values in bad_values for value in values}
    hint = ""
    if dataset_mode == "multi-class" and all_bad == {255}:
        hint = "; where 255 marks void pixels set ignore_index 255 (masks of 0 and 255 alone: dataset_mode binary)"
    elif dataset_mode == "binary" and all_bad == {1}:
        hint = "; binary masks mark the foreground with 255, not 1 (or use dataset_mode multi-class)"
    if len(bad_values) == 1:
        name, values = bad_values[0]
        problems.append(f"{name}: values {_list_values(values)} outside {allowed} ({setting}){hint}")
    elif bad_values:
        items = [f"{Path(name).name} {_list_values(values)}" for name, values in bad_values]
        problems.append(
            f"{split}: {len(bad_values)} masks with values outside {allowed} ({setting}): {_list_names(items)}{hint}"
        )

    sizes = [
        (c.pair.stem, c.image_size, c.mask_size)
        for c in checks
        if c.image_size is not None and c.mask_size is not None and c.image_size != c.mask_size
    ]
    if sizes:
        items = [f"{stem} ({_size(a)} vs {_size(b)})" for stem, a, b in sizes]
        problems.append(f"{split}: image and mask sizes differ for {_list_names(items)}")
    return problems


def _check_num_classes(dataset_mode: str, num_classes: int) -> None:
    """Raise ConfigError naming `num_classes` when it does not fit the mode."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes: must be an integer of at least 2 (background + 1 class), got {num_classes!r}")
    if dataset_mode == "binary" and num_classes != 2:
        raise ConfigError(f"num_classes: must be 2 for dataset_mode binary, got {num_classes}")


def index_dataset(
    data_dir: str | os.PathLike, dataset_mode: str, num_classes: int, require_test: bool = True,
    ignore_value: int | None = None,
) -> DatasetIndex:
    """Pair and validate every file of a dataset folder; raise one DatasetError listing all problems.

    Checks folders, image/mask name matching, duplicate names, that every file decodes completely, mask values
    (multi-class: 0..num_classes-1; binary: 0 and 255), image/mask sizes, and that no image is in both train and
    test. Hidden files and non-image files are ignored. Without `require_test` a missing test folder is allowed
    and gives an empty test list. `ignore_value` (evaluation's ignore_index, e.g. 255 = void) is accepted in
    multi-class masks besides the class ids.
    """
    mode = canonical_dataset_mode(dataset_mode)
    _check_num_classes(mode, num_classes)
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset {data_dir}: folder not found (expected train/ and test/ with images/ and masks/)")

    problems: list[str] = []
    pairs: dict[str, list[Pair]] = {}
    for split in SPLITS:
        if split == "test" and not require_test and not (root / split).exists():
            pairs[split] = []
            continue
        pairs[split] = _scan_split(root, split, problems)

    jobs = [(split, pair) for split in SPLITS for pair in pairs[split]]
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
        results = list(pool.map(lambda job: _check_pair(job[1], mode, num_classes, ignore_value), jobs))
    checks: dict[str, list[_FileCheck]] = {split: [] for split in SPLITS}
    for (split, _), check in zip(jobs, results):
        checks[split].append(check)
    for split in SPLITS:
        problems.extend(_file_problems(root, split, checks[split], mode, num_classes))

    train_by_hash: dict[str, Path] = {}
    for check in checks["train"]:
        if check.image_hash is not None:
            train_by_hash.setdefault(check.image_hash, check.pair.image)
    shared = [
        f"{train_by_hash[c.image_hash].relative_to(root).as_posix()} = {c.pair.image.relative_to(root).as_posix()}"
        for c in checks["test"]
        if c.image_hash in train_by_hash
    ]
    if shared:
        problems.append(
            f"{_plural(len(shared), 'image')} in both train and test ({_list_names(shared)}); "
            "remove them from one split so the test stays unseen"
        )

    if problems:
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise DatasetError(f"dataset {data_dir}: {count}: " + "; ".join(problems))
    return DatasetIndex(data_dir=root, train=pairs["train"], test=pairs["test"])


def split_train_val(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (train, val), deterministic for a seed and independent of the input order.

    The val part holds round(len * val_fraction) pairs, at least 1 when val_fraction > 0 and there are two or
    more pairs; the train part is never empty. Both parts are sorted by stem.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction: must be a number in [0, 1), got {val_fraction!r}")
    ordered = sorted(pairs, key=lambda pair: (pair.stem, str(pair.image)))
    count = len(ordered)
    num_val = round(count * val_fraction)
    if val_fraction > 0 and count >= 2:
        num_val = max(1, num_val)
    num_val = min(num_val, max(count - 1, 0))
    if num_val == 0:
        return ordered, []
    chosen = set(np.random.default_rng(seed).permutation(count)[:num_val].tolist())
    train = [pair for i, pair in enumerate(ordered) if i not in chosen]
    val = [pair for i, pair in enumerate(ordered) if i in chosen]
    return train, val


def class_histogram(pairs: list[Pair], dataset_mode: str, num_classes: int) -> np.ndarray:
    """Pixel count per class (int64, length num_classes) over the masks at their native size."""
    mode = canonical_dataset_mode(dataset_mode)

    def count(pair: Pair) -> np.ndarray:
        ids = load_mask(pair.mask, mode)
        counts = np.bincount(ids.ravel(), minlength=num_classes)
        if len(counts) > num_classes:
            raise DatasetError(f"{pair.mask}: values up to {len(counts) - 1} outside 0..{num_classes - 1}")
        return counts

    total = np.zeros(num_classes, dtype=np.int64)
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
        for counts in pool.map(count, pairs):
            total += counts
    return total


# ---------------------------------------------------------------------------------------------------------------
# Resizing and tensors


def _nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array (pixel-centre sampling; values are never mixed)."""
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def resize_pair(
    image: np.ndarray, mask: np.ndarray, image_size: int, resize_mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Bring an HxWx3 (or HxW grey) uint8 image and its HxW mask to image_size x image_size.

    'resize' stretches to the square; 'crop' keeps the aspect ratio: it takes the centred square of the short
    side (the same as resizing the short side to image_size and centre-cropping). The image is resampled
    bicubically (antialiased when shrinking), the mask by nearest neighbour so class ids stay valid.
    """
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"resize_mode: unknown value {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or mask.shape != image.shape[:2]:
        raise ValueError(f"resize_pair expects HxWx3 or HxW image and HxW mask, got {image.shape} and {mask.shape}")
    if resize_mode == "crop":
        height, width = mask.shape
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
        mask = mask[top : top + side, left : left + side]
    if image.shape[:2] != (image_size, image_size):
        resized = Image.fromarray(np.ascontiguousarray(image)).resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
        image = np.array(resized, dtype=np.uint8)
        mask = _nearest(mask, image_size, image_size)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def _compact(mask: np.ndarray) -> np.ndarray:
    """Store class ids in the smallest integer type that holds them (uint8 for up to 256 classes)."""
    high = int(mask.max()) if mask.size else 0
    if high < 256:
        return mask.astype(np.uint8)
    if high < 2**15:
        return mask.astype(np.int16)
    return mask.astype(np.int32)


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask pairs as tensors at image_size x image_size, with no randomness (flips belong to training).

    Items: {"image": float32 CxSxS in [-1, 1], "mask": int64 SxS class ids, "index": int}, C being
    `image_channels` (1: the images loaded as grey, see `load_image`). With `cache` the resized uint8 image and
    compact mask of each pair are kept in memory after their first load; `load_ahead` makes those first loads on
    background threads, in the order the items will be asked for.
    """

    def __init__(
        self,
        pairs: list[Pair],
        image_size: int,
        dataset_mode: str,
        resize_mode: str = "resize",
        cache: bool = True,
        image_channels: int = 3,
    ) -> None:
        if image_channels not in (1, 3):
            raise ValueError(f"SegmentationDataset: image_channels must be 1 or 3, got {image_channels!r}")
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode: unknown value {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size: must be a positive integer, got {image_size!r}")
        self.pairs = list(pairs)
        self.image_size = image_size
        self.dataset_mode = canonical_dataset_mode(dataset_mode)
        self.resize_mode = resize_mode
        self.cache = cache
        self.image_channels = image_channels
        self._cached: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.pairs)
        self._pending: dict[int, Future] = {}  # loads queued by load_ahead, read and removed by this thread only
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def load_ahead(self, indices: list[int], threads: int) -> None:
        """Decode and resize the pairs `indices`, in that order, on `threads` background threads into the cache,
        so that training's first epoch finds its batches loaded instead of decoding them between its steps (the
        decoder and the resampler release the GIL). An item asked for before its turn waits for its load. The
        arrays are the same as those loaded in the step, so results do not change. No-op without `cache`."""
        if not self.cache or threads < 1:
            return
        todo = [i for i in dict.fromkeys(indices) if self._cached[i] is None and i not in self._pending]
        if not todo:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="load_ahead")
        for index in todo:
            self._pending[index] = self._pool.submit(self._load, index)

    def stop_loading(self) -> None:
        """Cancel the loads not started yet and wait for the running ones (the end of training)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and resize one pair; into the cache when `cache` (a list slot: safe from a loading thread)."""
        pair = self.pairs[index]
        image, mask = resize_pair(
            load_image(pair.image, self.image_channels), load_mask(pair.mask, self.dataset_mode),
            self.image_size, self.resize_mode,
        )
        arrays = (image, _compact(mask))
        if self.cache:
            self._cached[index] = arrays
        return arrays

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The resized uint8 image and compact mask of one pair: from the cache, from its load ahead (waited
        for), or loaded now."""
        pending = self._pending.pop(index, None) if self._pending else None
        arrays = self._cached[index]
        if arrays is not None:
            return arrays
        if pending is not None and not pending.cancelled():
            return pending.result()  # a failed load raises its error here, in the step that needs the pair
        return self._load(index)

    def __getitem__(self, index: int) -> dict:
        image, mask = self._arrays(index)
        if image.ndim == 2:  # grey: one channel
            image = image[:, :, None]
        image_tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        mask_tensor = torch.from_numpy(mask.astype(np.int64))
        return {"image": image_tensor.contiguous(), "mask": mask_tensor, "index": index}


def one_hot(mask: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """Turn int64 NxHxW class ids into a float32 NxCxHxW one-hot map (the one place this map is made). Pixels of
    value `ignore_index` (void) get no class: all zeros, as the null label has everywhere."""
    if mask.dim() != 3 or mask.dtype != torch.int64:
        raise ValueError(f"one_hot expects an int64 NxHxW mask, got {mask.dtype} {tuple(mask.shape)}")
    n, height, width = mask.shape
    out = torch.zeros(n, num_classes, height, width, dtype=torch.float32, device=mask.device)
    if ignore_index is None:
        return out.scatter_(1, mask.unsqueeze(1), 1.0)
    void = mask == ignore_index
    out.scatter_(1, mask.masked_fill(void, 0).unsqueeze(1), 1.0)
    return out.masked_fill_(void.unsqueeze(1), 0.0)

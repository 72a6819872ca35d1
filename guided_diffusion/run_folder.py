"""Run folders and the files a run writes: JSON, sample images in ISDM's layout, grids and CSV logs.

Every action writes into a fresh, numbered folder ``<root>/<action>_<NNN>`` (``train_001``, ``sample_002``, ...)
that is never reused, so an old run is never overwritten. Sampling keeps ISDM's output layout::

    <run>/images/<stem>.png          the real image the mask came from (when there is one)
    <run>/labels/<stem>.png          the mask as class ids (uint8, or uint16 for more than 256 classes)
    <run>/colored_labels/<stem>.png  the mask in the palette colours
    <run>/samples/<stem>.png         the synthetic image
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no flock, so runs go on unlocked (FileLock)
    fcntl = None

SAMPLE_FOLDERS = ("images", "labels", "colored_labels", "samples")
"""The sub-folders of a sampling run, as ISDM names them."""

_FIRST_COLOURS = (
    (255, 0, 0),
    (0, 200, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 128, 0),
    (128, 0, 255),
    (0, 255, 128),
    (255, 0, 128),
    (128, 255, 0),
    (0, 128, 255),
    (160, 0, 0),
    (0, 120, 0),
    (0, 0, 150),
    (150, 150, 0),
    (150, 0, 150),
    (0, 150, 150),
    (255, 140, 140),
    (140, 140, 255),
)
"""Hand-picked saturated colours for classes 1..20 (class 0, the background, is black)."""

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_GRID_SEPARATOR = 2
_GRID_SEPARATOR_VALUE = 255
_PLACEHOLDER_VALUE = 128


# --------------------------------------------------------------------------------------------------------------
# Run folders and JSON
# --------------------------------------------------------------------------------------------------------------


def _run_pattern(action: str | None) -> re.Pattern[str]:
    """The folder-name pattern of runs of ``action`` (any action when None); group 'number' is the run number."""
    prefix = re.escape(action) if action is not None else r"[^/\\]+?"
    return re.compile(rf"^(?P<action>{prefix})_(?P<number>\d{{3,}})$")


def _runs(root: Path, action: str | None) -> list[tuple[int, Path]]:
    """The existing run folders of ``action`` under ``root`` with their numbers, unsorted."""
    if not root.is_dir():
        return []
    pattern = _run_pattern(action)
    runs = []
    for entry in root.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir():
            runs.append((int(match.group("number")), entry))
    return runs


def new_run_dir(root: Path | str, action: str, max_attempts: int = 1000) -> Path:
    """Create and return a fresh folder ``root/<action>_<NNN>``, NNN being one more than the highest existing one.

    An existing folder is never reused: the folder is made with ``exist_ok=False``, and when another process
    made the same number first, the number is worked out again and the next one is tried.
    """
    if not action or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", action):
        raise ValueError(f"run action {action!r} must be a non-empty name of letters, digits, '_', '.' or '-'")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    number = 0
    for _ in range(max_attempts):
        highest = max((n for n, _ in _runs(root, action)), default=0)
        number = max(number, highest) + 1
        candidate = root / f"{action}_{number:03d}"
        try:
            candidate.mkdir(exist_ok=False)
        except FileExistsError:
            continue  # another process (or a stray file) took this number; look again
        return candidate
    raise RuntimeError(f"could not create a new run folder for {action!r} under {root} in {max_attempts} tries")


class FileLock:
    """An exclusive lock of a file (flock), held until `release()` or the end of the process, however it ends: a
    killed or preempted process leaves nothing to clean up. `FileLock.take` returns None when another process holds
    it. On a file system that does not lock (some cluster mounts without flock), or without flock at all (Windows),
    the lock is taken unlocked and every file reads as free, as if there were no locks."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @classmethod
    def take(cls, path: Path | str, wait: bool = False) -> FileLock | None:
        """The lock of `path` (opened for appending, created if missing); with `wait`, once the holder lets go
        (never None)."""
        handle = open(path, "a", encoding="utf-8")
        if fcntl is None:
            return cls(handle)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except OSError:  # ENOLCK, EOPNOTSUPP, ENOSYS: this file system does not lock
            pass
        return cls(handle)

    def release(self) -> None:
        self.handle.close()

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()


RUN_LOCK = "run.lock"
"""The file a run holds in its folder while it runs (`hold_run`), so that another process's `auto_resume` leaves
that run to it."""


def hold_run(run_dir: Path) -> FileLock | None:
    """Hold the run folder `run_dir` for this process (None when another process holds it)."""
    return FileLock.take(Path(run_dir) / RUN_LOCK)


def run_is_held(run_dir: Path) -> bool:
    """Whether a live process holds the run folder `run_dir` (a run that never held it, or ended, does not)."""
    if not (Path(run_dir) / RUN_LOCK).exists():
        return False
    lock = hold_run(run_dir)
    if lock is None:
        return True
    lock.release()
    return False


def run_dirs_newest_first(root: Path | str, action: str) -> list[Path]:
    """The run folders of ``action`` under ``root``, the highest number first."""
    return [path for _, path in sorted(_runs(Path(root), action), key=lambda run: (run[0], run[1].name),
                                       reverse=True)]


def latest_run_dir(root: Path | str, action: str | None = None) -> Path | None:
    """The newest run folder of ``action`` under ``root`` (highest number), or None when there is none.

    With ``action=None`` runs of every action are considered; their numbers are not comparable, so the most
    recently modified folder wins, ties broken by the higher number.
    """
    runs = _runs(Path(root), action)
    if not runs:
        return None
    if action is not None:
        return max(runs, key=lambda run: (run[0], run[1].name))[1]
    return max(runs, key=lambda run: (run[1].stat().st_mtime_ns, run[0], run[1].name))[1]


def _json_default(value: Any) -> Any:
    """Turn the non-JSON values a config or metric dict may hold (paths, numpy, tensors, dataclasses) into JSON."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def temp_path(path: Path, pid: int | None = None) -> Path:
    """The temporary file beside ``path`` that process ``pid`` (this one by default) writes before moving it onto
    ``path``: ``.<name>.tmp-<pid>``, so a temporary file left by a killed process can be told by its pid."""
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextmanager
def atomic_write(path: Path | str, sync_folder: bool = False) -> Iterator[BinaryIO]:
    """The one way a file is written whole or not at all: yields a binary handle on ``temp_path(path)``; when the
    block ends, the file is flushed, fsynced and moved onto ``path`` with ``os.replace`` (readers see the old
    file or the new one, a kill never leaves half a file under the real name), then with ``sync_folder`` the
    folder is fsynced too (checkpoints). On an error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        _fsync_folder(path.parent)


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_write``)."""
    with atomic_write(path) as handle:
        handle.write(data)


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON (keys in their given order), atomically: readers see the old or new file."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default, ensure_ascii=False) + "\n"
    write_bytes(path, text.encode("utf-8"))


def as_written(data: Any) -> Any:
    """``data`` as `write_json` stores it and `json.load` reads it back (paths as strings, tuples as lists, ...)."""
    return json.loads(json.dumps(data, default=_json_default))


def write_csv(path: Path | str, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as a CSV file, atomically (nothing when there are none): the columns are the rows' keys in the
    order first met (a row without one leaves its cell empty); floats at full precision, undefined values as nan
    (as metrics.csv has them)."""
    if not rows:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, text.getvalue().encode("utf-8"))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Colours and image conversion
# --------------------------------------------------------------------------------------------------------------


def _generated_colours() -> Iterator[tuple[int, int, int]]:
    """Endless deterministic colours: golden-ratio hues, cycling through a few saturation/brightness levels."""
    levels = ((1.0, 1.0), (0.75, 0.85), (1.0, 0.65), (0.55, 1.0), (0.85, 0.5))
    index = 0
    while True:
        hue = (index * _GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation, value = levels[(index // 7) % len(levels)]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        yield (round(red * 255), round(green * 255), round(blue * 255))
        index += 1


def palette(num_classes: int) -> np.ndarray:
    """Colours for ``num_classes`` classes, uint8 of shape (num_classes, 3): class 0 black, all colours distinct.

    Classes 1..20 get hand-picked saturated colours, later ones golden-ratio hues; the result depends on
    ``num_classes`` only through its length (palette(n) is a prefix of palette(n + k)).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if num_classes > 2**24:
        raise ValueError(f"num_classes must be at most {2**24} to have distinct colours, got {num_classes}")
    colours: list[tuple[int, int, int]] = [(0, 0, 0)]
    used = {colours[0]}
    candidates = iter(_FIRST_COLOURS)
    generated = _generated_colours()
    while len(colours) < num_classes:
        colour = next(candidates, None)
        if colour is None:
            colour = next(generated)
        if colour in used:
            continue
        used.add(colour)
        colours.append(colour)
    return np.asarray(colours, dtype=np.uint8)


VOID_COLOUR = (255, 255, 255)
"""The colour of void pixels (value `ignore_index`) in colored labels and grids; no class is white."""


def _class_ids(mask: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """`mask` checked to hold class ids 0..num_classes-1, and `ignore_index` where pixels are void."""
    mask = np.asarray(mask)
    ids = mask[mask != ignore_index] if ignore_index is not None else mask
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"mask holds class ids {ids.min()}..{ids.max()}, outside 0..{num_classes - 1}")
    return mask


def colorize(mask: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Paint a class-id mask (int, HxW) with :func:`palette`, void pixels (`ignore_index`) in VOID_COLOUR;
    returns uint8 HxWx3."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW class ids), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integer class ids, got dtype {mask.dtype}")
    return _paint(_class_ids(mask, num_classes, ignore_index), palette(num_classes), ignore_index)


def _paint(mask: np.ndarray, colours: np.ndarray, ignore_index: int | None) -> np.ndarray:
    if ignore_index is None:
        return colours[mask]
    void = mask == ignore_index
    painted = colours[np.where(void, 0, mask)]
    painted[void] = VOID_COLOUR
    return painted


def to_uint8_image(x: torch.Tensor, keep_gray: bool = False) -> np.ndarray:
    """Turn a float CHW image in [-1, 1] into uint8 HxWx3 (clamped, ``((x + 1) * 127.5).round()``).

    A one-channel image is repeated to three channels, or with ``keep_gray`` returned as uint8 HxW.
    """
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a CHW image with 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    image = ((x + 1.0) * 127.5).round().to(torch.uint8)
    if image.shape[0] == 1 and keep_gray:
        return image[0].contiguous().numpy()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).contiguous().numpy()


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    """Check that ``image`` is uint8 HxW, HxWx1 or HxWx3 and return it as HxWx3."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"{what} must be HxWx3 (or HxW grey), got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def _as_stored(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as it is written: a grey one (HxW or HxWx1) as HxW (an 8-bit grey png, mode L), else HxWx3."""
    rgb = _as_rgb(image, what)  # checks dtype and shape
    image = np.asarray(image)
    return image.reshape(image.shape[:2]) if image.ndim == 2 or image.shape[2] == 1 else rgb


def _label_array(mask: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """The mask as stored in labels/: uint8 up to 256 classes, uint16 beyond; void pixels keep `ignore_index`."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be a 2-D integer array of class ids, got {mask.dtype} {mask.shape}")
    return _class_ids(mask, num_classes, ignore_index).astype(np.uint8 if num_classes <= 256 else np.uint16)


def _png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 HxWx3 / HxW or uint16 HxW array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path | str, array: np.ndarray) -> None:
    """Write a uint8 image array as a PNG file, atomically."""
    write_bytes(path, _png_bytes(array))


# --------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------


class SampleWriter:
    """Writes ISDM's sample layout under run_dir: images/ (the real image the mask came from, if any), labels/
    (class-id mask png, uint8 or uint16 if num_classes > 256), colored_labels/ (palette png), samples/ (synthetic
    image png) — the same file stem in each folder. Grey images (HxW or HxWx1) are written as 8-bit grey pngs.
    Void pixels (`ignore_index`) keep their value in labels/ and are white in colored_labels/."""

    def __init__(self, run_dir: Path | str, num_classes: int, ignore_index: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._palette = palette(num_classes)
        for folder in SAMPLE_FOLDERS:
            (self.run_dir / folder).mkdir(parents=True, exist_ok=True)

    def paths(self, stem: str) -> dict[str, Path]:
        """The four file paths of ``stem``, keyed by folder name."""
        return {folder: self.run_dir / folder / f"{stem}.png" for folder in SAMPLE_FOLDERS}

    def write(self, stem: str, sample: np.ndarray, mask: np.ndarray, real_image: np.ndarray | None) -> None:
        """Write one sample, its mask (ids and colours) and its real image; FileExistsError if any file exists."""
        if not stem or Path(stem).name != stem or stem in (".", ".."):
            raise ValueError(f"sample stem {stem!r} must be a plain file name without folders")
        sample = _as_stored(sample, "sample")
        labels = _label_array(mask, self.num_classes, self.ignore_index)
        if labels.shape != sample.shape[:2]:
            raise ValueError(f"mask shape {labels.shape} does not match sample shape {sample.shape[:2]}")
        files = {
            "samples": _png_bytes(sample),
            "labels": _png_bytes(labels),
            "colored_labels": _png_bytes(_paint(labels, self._palette, self.ignore_index)),
        }
        if real_image is not None:
            files["images"] = _png_bytes(_as_stored(real_image, "real image"))
        paths = self.paths(stem)
        for folder in files:
            if paths[folder].exists():
                raise FileExistsError(f"{paths[folder]} already exists; refusing to overwrite a sample")
        for folder, data in files.items():
            with open(paths[folder], "xb") as handle:  # "x": never overwrite, even in a race
                handle.write(data)

    def discard(self, stem: str) -> None:
        """Remove whatever files of ``stem`` exist: the leftovers of a run stopped while it wrote them."""
        for path in self.paths(stem).values():
            path.unlink(missing_ok=True)

    def read(self, stem: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The (mask, real image or None, sample) that `write` stored under ``stem``, as arrays."""
        paths = self.paths(stem)

        def load(folder: str) -> np.ndarray:
            with Image.open(paths[folder]) as image:
                return np.asarray(image)

        return load("labels"), load("images") if paths["images"].exists() else None, load("samples")


def _resize(image: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    """Resize a uint8 HxWx3 image when its size differs from (height, width)."""
    if image.shape[:2] == (height, width):
        return image
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def grid_array(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """The uint8 picture of `rows` of uint8 HxWx3 cells of one size, separated by 2 white pixels."""
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one row of at least one cell")
    height, width = rows[0][0].shape[:2]
    columns, sep = len(rows[0]), _GRID_SEPARATOR
    grid = np.full((len(rows) * height + (len(rows) - 1) * sep, columns * width + (columns - 1) * sep, 3),
                   _GRID_SEPARATOR_VALUE, dtype=np.uint8)
    for row_index, cells in enumerate(rows):
        top = row_index * (height + sep)
        for column, cell in enumerate(cells):
            left = column * (width + sep)
            grid[top : top + height, left : left + width] = cell
    return grid


def write_grid(
    path: Path | str,
    rows: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    num_classes: int,
    max_rows: int = 8,
    ignore_index: int | None = None,
) -> None:
    """Write a preview PNG: one row per (mask, real image or None, synthetic image), at most ``max_rows`` rows.

    Each row shows colored mask | real image (grey when None) | synthetic image, cells separated by 2 white
    pixels. The cell size is the first synthetic image's size; other cells are resized to it.
    """
    rows = list(rows)[:max_rows]
    if not rows:
        raise ValueError("write_grid needs at least one row")
    height, width = _as_rgb(rows[0][2], "synthetic image").shape[:2]
    cells = []
    for mask, real_image, sample in rows:
        if real_image is None:
            real = np.full((height, width, 3), _PLACEHOLDER_VALUE, dtype=np.uint8)
        else:
            real = _resize(_as_rgb(real_image, "real image"), height, width, nearest=False)
        cells.append((
            _resize(colorize(mask, num_classes, ignore_index), height, width, nearest=True),
            real,
            _resize(_as_rgb(sample, "synthetic image"), height, width, nearest=False),
        ))
    write_png(path, grid_array(cells))


def write_legend(path: Path | str, class_names: Sequence[str], swatch: int = 14) -> None:
    """Write the colour legend of a run's masks: one row per class, its palette colour then "<id> <name>"."""
    from PIL import ImageDraw

    colours = palette(len(class_names))
    rows = [f"{i} {name}" for i, name in enumerate(class_names)]
    width = swatch + 12 + 6 * max(len(row) for row in rows)  # PIL's default bitmap font: about 6 px a character
    image = Image.new("RGB", (width, len(rows) * (swatch + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, row in enumerate(rows):
        top = 4 + i * (swatch + 4)
        draw.rectangle((4, top, 4 + swatch - 1, top + swatch - 1), fill=tuple(int(c) for c in colours[i]),
                       outline=(128, 128, 128))
        draw.text((swatch + 10, top + 1), row, fill=(0, 0, 0))
    write_png(path, np.asarray(image))


class CsvLog:
    """Append-only CSV log (one row per call), header written once; flushes every row; reopening an existing
    file for resume appends without repeating the header.

    The columns are ``fieldnames``; when it is empty they are taken from the first row's keys. Reopening a file
    whose header differs from ``fieldnames`` raises ValueError rather than mixing two layouts in one file.
    """

    def __init__(self, path: Path | str, fieldnames: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        requested = list(fieldnames) if fieldnames else None
        existing = self._existing_header()
        if existing is not None and requested is not None and existing != requested:
            raise ValueError(f"CSV log {self.path} has columns {existing}, not {requested}; use a new file")
        self.fieldnames: list[str] | None = existing if existing is not None else requested
        self._header_written = existing is not None
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        if self._header_written and not self._ends_with_newline():
            self._file.write("\n")  # a row cut short by a kill: start the next row on its own line
            self._file.flush()
        self._writer: csv.DictWriter | None = None

    def _existing_header(self) -> list[str] | None:
        """The header of an existing, non-empty log file, or None."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        with open(self.path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
        return header or None

    def _ends_with_newline(self) -> bool:
        """Whether the existing file ends with a newline."""
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (missing columns left empty; unknown keys raise ValueError) and flush it."""
        if self._file.closed:
            raise ValueError(f"CSV log {self.path} is closed")
        if self.fieldnames is None:
            self.fieldnames = list(row)
        unknown = [key for key in row if key not in self.fieldnames]
        if unknown:
            raise ValueError(f"CSV log {self.path} has no columns {unknown}; its columns are {self.fieldnames}")
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames, lineterminator="\n")
        if not self._header_written:
            self._writer.writeheader()
            self._header_written = True
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        """Close the file; later writes raise ValueError."""
        self._file.close()

    def __enter__(self) -> CsvLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

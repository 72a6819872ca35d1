"""The embedded demo dataset: procedural metal/tile textures with drawn defects and exact masks.

Classes: 0 background, 1 scratch (thin bright lines), 2 spot (round dark rust blobs), 3 crack (jagged dark
random walks, rare). A few images are defect-free. Every file is a deterministic function of the parameters, so
the same seed gives byte-identical files. Run ``python -m guided_diffusion.demo [out_dir]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ConfigError, DatasetError, UserError

CLASSES = ("background", "scratch", "spot", "crack")
SCRATCH, SPOT, CRACK = 1, 2, 3
DEFAULT_OUT_DIR = "datasets/demo"
_FORMAT_VERSION = 1
_SPLIT_IDS = {"train": 0, "test": 1}

# Chance that an image holds each defect class; cracks are rare on purpose.
_P_DEFECT_FREE = 0.1
_P_SCRATCH = 0.6
_P_SPOT = 0.5
_P_CRACK = 0.15


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def _smear(noise: np.ndarray, length: int) -> np.ndarray:
    """Moving average along axis 1 with wrap-around (turns white noise into brushed streaks)."""
    padded = np.concatenate([noise[:, -length:], noise, noise[:, :length]], axis=1)
    summed = np.cumsum(padded, axis=1)
    width = noise.shape[1]
    return (summed[:, 2 * length : 2 * length + width] - summed[:, length : length + width]) / length


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brushed-metal or tile-like texture with a smooth gradient and a per-image tint, HxWx3 in [0, 1]."""
    streaks = _smear(rng.normal(size=(size, size)), max(2, size // 4))
    streaks /= streaks.std() + 1e-8
    grain = rng.normal(size=(size, size))
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    gradient = np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)
    gray = rng.uniform(0.42, 0.6) + rng.uniform(0.1, 0.25) * gradient + 0.035 * streaks + 0.012 * grain
    if rng.random() < 0.5:  # tile seams
        period = size // int(rng.integers(2, 4))
        offset = int(rng.integers(0, period))
        gray[offset::period, :] -= 0.06
        gray[:, offset::period] -= 0.06
    if rng.random() < 0.5:  # brushed vertically instead of horizontally
        gray = gray.T
    tint = rng.uniform(0.88, 1.12, size=3)
    tint /= tint.mean()
    return gray[:, :, None] * tint[None, None, :]


def _stamp(size: int, rows: np.ndarray, cols: np.ndarray, radius: int) -> np.ndarray:
    """Boolean SxS map of the given points, thickened with a disk brush of `radius` pixels."""
    hit = np.zeros((size, size), dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            r, c = rows + dy, cols + dx
            keep = (r >= 0) & (r < size) & (c >= 0) & (c < size)
            hit[r[keep], c[keep]] = True
    return hit


def _scratch(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A thin, slightly bent straight line."""
    length = rng.uniform(0.35, 0.8) * size
    angle = rng.uniform(0.0, np.pi)
    center = rng.uniform(0.2, 0.8, size=2) * size
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    t = np.linspace(-0.5, 0.5, int(length * 2) + 2)
    bend = rng.uniform(-0.08, 0.08) * length * (0.25 - t**2)
    points = center[None, :] + t[:, None] * length * direction[None, :] + bend[:, None] * normal[None, :]
    rows, cols = np.rint(points).astype(np.int64).T
    return _stamp(size, rows, cols, int(scale // 2))


def _spot(rng: np.random.Generator, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A round/elliptic blob: its boolean map and the normalised distance from its centre (for shading)."""
    radius_y, radius_x = rng.uniform(2.0, 5.0, size=2) * scale
    center_y, center_x = rng.uniform(0.12, 0.88, size=2) * size
    yy, xx = np.mgrid[0:size, 0:size]
    distance = np.sqrt(((yy - center_y) / radius_y) ** 2 + ((xx - center_x) / radius_x) ** 2)
    return distance <= 1.0, distance


def _crack(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A jagged random walk with a few branches."""
    rows_all, cols_all = [], []
    walks = [(rng.uniform(0.15, 0.85, size=2) * size, rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.4, 0.8) * size)]
    while walks:
        position, heading, length = walks.pop()
        for _ in range(int(length)):
            heading += rng.normal(0.0, 0.08)  # the course wanders slowly ...
            step = heading + rng.normal(0.0, 0.75)  # ... while each step zig-zags around it
            position = position + np.array([np.sin(step), np.cos(step)])
            rows_all.append(position[0])
            cols_all.append(position[1])
            if rng.random() < 0.04 / scale and length > 0.15 * size:
                walks.append((position.copy(), heading + rng.choice([-1.0, 1.0]) * 0.8, length * 0.4))
    rows = np.rint(np.array(rows_all)).astype(np.int64)
    cols = np.rint(np.array(cols_all)).astype(np.int64)
    return _stamp(size, rows, cols, int(scale // 2))


def _defect_classes(rng: np.random.Generator, index: int) -> list[int]:
    """Which defect classes an image holds: image 0 is defect-free, image 1 has a crack, others by chance."""
    if index == 0:
        return []
    if index == 1:
        return [SCRATCH, CRACK]
    if rng.random() < _P_DEFECT_FREE:
        return []
    chosen = [
        cls for cls, p in ((SCRATCH, _P_SCRATCH), (SPOT, _P_SPOT), (CRACK, _P_CRACK)) if rng.random() < p
    ]
    return chosen or [SCRATCH]


def render_example(seed: int, split: str, index: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One demo image (uint8 HxWx3) and its mask (uint8 HxW class ids); a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    scale = image_size / 64.0
    image = _background(rng, image_size)
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for cls in _defect_classes(rng, index):
        for _ in range(int(rng.integers(1, 3))):
            if cls == SCRATCH:
                hit = _scratch(rng, image_size, scale)
                image[hit] = np.clip(image[hit] + 0.32, 0.0, 1.0) * 0.5 + 0.5 * rng.uniform(0.9, 1.0)
            elif cls == SPOT:
                hit, distance = _spot(rng, image_size, scale)
                rust = np.array([0.38, 0.2, 0.1]) * rng.uniform(0.7, 1.1)
                shade = 0.55 + 0.45 * distance[hit]  # darker in the middle
                image[hit] = rust[None, :] * shade[:, None]
            else:
                hit = _crack(rng, image_size, scale)
                image[hit] = rng.uniform(0.03, 0.1)
            mask[hit] = cls
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), mask


# ---------------------------------------------------------------------------------------------------------------
# Writing the folder


def _parameters(num_train: int, num_test: int, image_size: int, seed: int) -> dict:
    """The record written to demo.json; equal records mean equal datasets."""
    return {
        "generator": "guided_diffusion.demo",
        "version": _FORMAT_VERSION,
        "num_train": num_train,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
    }


def _expected_files(num_train: int, num_test: int) -> list[str]:
    """Relative paths of every file the dataset consists of."""
    files = ["classes.json", "demo.json"]
    for split, count in (("train", num_train), ("test", num_test)):
        for index in range(count):
            files += [f"{split}/images/{split}_{index:03d}.png", f"{split}/masks/{split}_{index:03d}.png"]
    return files


def _check_arguments(num_train: int, num_test: int, image_size: int, seed: int) -> None:
    """Raise ConfigError naming the first argument out of range."""
    for name, value, low in (("num_train", num_train, 2), ("num_test", num_test, 1), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: must be an integer of at least {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")


def _existing_is_complete(out_dir: Path, parameters: dict) -> bool:
    """True when out_dir holds this very dataset; False when it is absent or empty; DatasetError otherwise."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise DatasetError(f"demo dataset {out_dir}: exists and is not a folder; choose another path")
    if not any(out_dir.iterdir()):
        return False
    record = out_dir / "demo.json"
    try:
        found = json.loads(record.read_text())
    except (OSError, ValueError):
        raise DatasetError(
            f"demo dataset {out_dir}: folder holds other content (no readable demo.json); "
            "choose an empty or new folder"
        ) from None
    if found != parameters:
        differ = ", ".join(f"{k}={found.get(k)!r}" for k in parameters if found.get(k) != parameters[k])
        raise DatasetError(
            f"demo dataset {out_dir}: made with other parameters ({differ}); delete it or choose another folder"
        )
    missing = [name for name in _expected_files(parameters["num_train"], parameters["num_test"])
               if not (out_dir / name).is_file()]
    if missing:
        raise DatasetError(
            f"demo dataset {out_dir}: incomplete ({len(missing)} files missing, e.g. {missing[0]}); "
            "delete the folder to make it again"
        )
    return True


def _write(folder: Path, parameters: dict) -> None:
    """Write every file of the dataset into an existing empty folder; demo.json last."""
    for split in ("train", "test"):
        (folder / split / "images").mkdir(parents=True)
        (folder / split / "masks").mkdir(parents=True)
        for index in range(parameters[f"num_{split}"]):
            image, mask = render_example(parameters["seed"], split, index, parameters["image_size"])
            name = f"{split}_{index:03d}.png"
            Image.fromarray(image, mode="RGB").save(folder / split / "images" / name)
            Image.fromarray(mask, mode="L").save(folder / split / "masks" / name)
    (folder / "classes.json").write_text(json.dumps({"classes": list(CLASSES)}, indent=1) + "\n")
    (folder / "demo.json").write_text(json.dumps(parameters, indent=1) + "\n")


def make_demo_dataset(
    out_dir: str | os.PathLike, num_train: int = 40, num_test: int = 12, image_size: int = 64, seed: int = 0
) -> Path:
    """Write the demo dataset to out_dir (train|test/images|masks/*.png, classes.json, demo.json); return it.

    Does nothing when out_dir already holds the dataset made with these parameters; raises DatasetError when
    out_dir holds anything else. The files are written to a temporary sibling folder and moved into place, so an
    interrupted run never leaves a half-written dataset.
    """
    _check_arguments(num_train, num_test, image_size, seed)
    out_dir = Path(out_dir)
    parameters = _parameters(num_train, num_test, image_size, seed)
    if _existing_is_complete(out_dir, parameters):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write(staging, parameters)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except OSError:
        if _existing_is_complete(out_dir, parameters):  # another process made the same dataset meanwhile
            return out_dir
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line: write the demo dataset and print where it is."""
    parser = argparse.ArgumentParser(prog="python -m guided_diffusion.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=DEFAULT_OUT_DIR, help=f"default: {DEFAULT_OUT_DIR}")
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = make_demo_dataset(args.out_dir, args.num_train, args.num_test, args.image_size, args.seed)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"demo dataset: {path} ({args.num_train} train, {args.num_test} test, {len(CLASSES)} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

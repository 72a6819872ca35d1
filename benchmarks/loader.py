"""Data-loading throughput of training, printed as a table (issue 15: does loading keep up at 128 px and more?).

    python benchmarks/loader.py                                  # magnetic-tile at 128, 256 and 512 px
    python benchmarks/loader.py --large 2048x1024 --sizes 256,512  # + generated RGB photos of that size

Training loads its batches the way this script times them: the trainer's SegmentationDataset (decode, convert,
resize, compact the mask) item by item, stacked into batches of --batch-size, in the training process. Each
pair is decoded and resized once, in the first epoch ("uncached"), and kept in memory as uint8 at image_size;
every later epoch only copies it out ("cached"). The first epoch's loads run in the training step, or (training's
`data_threads`, 4 by default) on background threads ahead of the steps ("threads ahead": timed here with nothing
else to do, so it is the rate those threads can feed). The table gives the rates in images/s and the cache's
size.
Compare them with the training images/s of benchmarks/speed.py at the same size: loading is off the critical path
when its rate is far above the training rate. Run it on an otherwise idle machine; figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.data import SegmentationDataset, first_colour_image, index_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "magnetic-tile"),
                        help="a dataset folder (train/images, train/masks); '' = none")
    parser.add_argument("--dataset-mode", default="multi-class")
    parser.add_argument("--sizes", default="128,256,512", help="image_size values to time, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=96, help="pairs timed per dataset (the first ones)")
    parser.add_argument("--large", default="", metavar="WxH",
                        help="also time --images generated RGB photos (noise texture, PNG) of this native size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--ahead-threads", type=int, default=4,
                        help="threads of the 'ahead' column (training's data_threads; default: its default)")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--sizes: give at least one positive size")
    if args.ahead_threads < 1:
        parser.error("--ahead-threads must be at least 1")
    if args.batch_size < 1 or args.images < args.batch_size:
        parser.error("--batch-size must be >= 1 and --images >= --batch-size")
    if args.large:
        try:
            width, height = (int(v) for v in args.large.lower().split("x"))
        except ValueError:
            parser.error(f"--large: expected WxH, e.g. 2048x1024, got {args.large!r}")
        if width < 1 or height < 1:
            parser.error(f"--large: both sides must be positive, got {args.large!r}")
        args.large = (width, height)
    if not args.data and not args.large:
        parser.error("nothing to time: give --data or --large")
    return args


def make_large_dataset(root: Path, count: int, width: int, height: int, num_classes: int = 6) -> Path:
    """`count` RGB photos of width x height with masks of a few rectangles: PNG, as users' datasets often are.
    The texture is smoothed noise, so PNG compresses it about as little as a photo."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / "train" / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        grain = rng.integers(-12, 13, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        mask = np.zeros((height, width), np.uint8)
        for label in range(1, num_classes):
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[top:top + height // 6, left:left + width // 6] = label
        Image.fromarray(pixels).save(root / "train" / "images" / f"{i:04d}.png")
        Image.fromarray(mask).save(root / "train" / "masks" / f"{i:04d}.png")
    return root


def time_pass(dataset: SegmentationDataset, batch_size: int) -> float:
    """Seconds to build every full batch of the dataset as the trainer does (items, then torch.stack)."""
    started = time.perf_counter()
    for first in range(0, len(dataset) - batch_size + 1, batch_size):
        items = [dataset[i] for i in range(first, first + batch_size)]
        torch.stack([it["image"] for it in items])
        torch.stack([it["mask"] for it in items])
    return time.perf_counter() - started


def measure(name: str, data_dir: str, dataset_mode: str, args: argparse.Namespace) -> list[str]:
    index = index_dataset(data_dir, dataset_mode, 2 if dataset_mode == "binary" else 256, require_test=False)
    pairs = index.train[:args.images]
    channels = 1 if first_colour_image([p.image for p in pairs]) is None else 3  # image_channels auto
    sides = [max(Image.open(p.image).size) for p in pairs]
    count = len(pairs) - len(pairs) % args.batch_size
    rows = []
    for size in args.sizes:
        time_pass(SegmentationDataset(pairs[:args.batch_size], size, dataset_mode, image_channels=channels),
                  args.batch_size)  # untimed warm-up: first calls of the decoder and the resampler
        dataset = SegmentationDataset(pairs, size, dataset_mode, image_channels=channels)
        uncached = time_pass(dataset, args.batch_size)
        ahead = SegmentationDataset(pairs, size, dataset_mode, image_channels=channels)
        started = time.perf_counter()
        ahead.load_ahead(list(range(count)), args.ahead_threads)  # training's data_threads
        time_pass(ahead, args.batch_size)
        loaded_ahead = time.perf_counter() - started
        ahead.stop_loading()
        cached = min(time_pass(dataset, args.batch_size) for _ in range(3))
        cache_bytes = sum(a.nbytes + m.nbytes for a, m in (entry for entry in dataset._cached if entry is not None))
        rows.append(f"| {name} | {statistics.median(sides)} | {channels} | {size} | {count / uncached:.0f} | "
                    f"{count / loaded_ahead:.0f} | {count / cached:.0f} | {cache_bytes / len(pairs) / 2**20:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batches of {args.batch_size}, up to {args.images} pairs per dataset, {torch.get_num_threads()} torch "
          "threads; images/s of the first epoch (decode + resize) and of a later one (from the cache)\n")
    print("| dataset | native side (median px) | channels | image_size | uncached img/s, in the step | "
          f"uncached img/s, {args.ahead_threads} threads ahead | cached img/s | cache MiB/pair |")
    print("|---|---|---|---|---|---|---|---|")
    if args.data:
        measure(Path(args.data).name, args.data, args.dataset_mode, args)
    if args.large:
        width, height = args.large
        with tempfile.TemporaryDirectory(prefix="loader_") as folder:
            data = make_large_dataset(Path(folder), args.images, width, height)
            measure(f"generated {width}x{height} RGB", str(data), "multi-class", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do two demo settings draw equally good grids? Label alignment of sample folders on the demo dataset.

    python benchmarks/demo_quality.py --data-dir datasets/demo --samples Results/demo/sample_001 /tmp/new/sample_001

A segmenter (Unet++ resnet18 from scratch, `--segmenter-steps` steps) is trained once on the dataset's real
train/ images; it then segments each sample folder's synthetic images (samples/), and the mIoU of its predictions
against the masks that conditioned them (labels/) is the folder's label alignment
(evaluation/segmenter/run.py). The same segmenter on the real test images gives the ceiling. One segmenter scores
every folder, so the folders are compared with each other, not with other runs of this script. Also printed per
folder: the mean grey level and the mean absolute difference between neighbouring pixels (graininess) of the
samples, against the real test images', since a grainy or washed-out grid can still be segmented.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.segmenter.model import SegmenterSpec, TrainSettings, train_segmenter  # noqa: E402
from evaluation.segmenter.run import Scoring, score  # noqa: E402  (on generated images: label alignment)
from guided_diffusion.data import IMAGE_EXTENSIONS, load_image, load_mask  # noqa: E402


def read_pairs(images_dir: Path, masks_dir: Path, dataset_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The (image, mask) pairs of two folders matched by file stem, as uint8 RGB and int64 class-id stacks."""
    masks = {path.stem: path for path in sorted(masks_dir.glob("*.png"))}
    images = [path for path in sorted(images_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS
              and path.stem in masks]
    if not images:
        raise SystemExit(f"error: no image in {images_dir} has a mask of the same name in {masks_dir}")
    return (np.stack([load_image(path) for path in images]),
            np.stack([load_mask(masks[path.stem], dataset_mode) for path in images]))


def image_statistics(images: np.ndarray) -> tuple[float, float]:
    """Mean grey level, and mean |difference| of horizontally neighbouring grey levels (graininess)."""
    grey = images.astype(np.float64).mean(axis=-1)
    return float(grey.mean()), float(np.abs(np.diff(grey, axis=-1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the dataset (train/ and test/ with images/, masks/)")
    parser.add_argument("--samples", nargs="+", required=True, help="sample run folders (samples/ and labels/)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--dataset-mode", default="multi-class")
    parser.add_argument("--segmenter-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = Path(args.data_dir)
    train_images, train_masks = read_pairs(data / "train" / "images", data / "train" / "masks", args.dataset_mode)
    test_images, test_masks = read_pairs(data / "test" / "images", data / "test" / "masks", args.dataset_mode)
    folders = {}
    for folder in map(Path, args.samples):
        folders[str(folder)] = read_pairs(folder / "samples", folder / "labels", args.dataset_mode)
    segmenter, _ = train_segmenter(train_images, train_masks, SegmenterSpec("unetplusplus", args.num_classes),
                                   TrainSettings(steps=args.segmenter_steps, batch_size=16, seed=args.seed),
                                   progress=False)
    print(f"segmenter: Unet++ resnet18, {args.segmenter_steps} steps on {len(train_images)} real train images")
    print("\n| images | count | label alignment mIoU | mean grey | graininess |")
    print("|---|---|---|---|---|")
    rows = {"real test images (ceiling)": (test_images, test_masks), **folders}
    for name, (images, masks) in rows.items():
        aligned = score(segmenter, images, masks, Scoring(args.num_classes)).miou
        grey, grain = image_statistics(images)
        print(f"| {name} | {len(images)} | {aligned:.3f} | {grey:.1f} | {grain:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Prints the class shares before/after balancing magnetic-tile, and how long the mask selection takes on CPU.

    OMP_NUM_THREADS=1 python benchmarks/balance_selection.py [--image-size 256] [--num-samples 500]

Shares: `num_samples` masks chosen from the val split (val_fraction 0.2, seed 0) to balance real (train/) +
synthetic, by pixel count and by object count, without and with mask augmentation. Timing: 1,000 masks selected
among 1,000 candidates (the 592 masks of train/ and test/ plus 408 of them flipped), loading/counting and the
selection timed apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.balance import (BalanceArgs, balance, count_all, format_table, load_masks,  # noqa: E402
                                      make_report, read_class_names)
from guided_diffusion.data import index_dataset, split_train_val  # noqa: E402

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=str(DATASET))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=500, help="masks chosen for the share tables")
    args = parser.parse_args()
    num_classes = 6
    names = read_class_names(args.data_dir, num_classes)
    index = index_dataset(args.data_dir, "multi-class", num_classes)
    _, val = split_train_val(index.train, 0.2, 0)
    pairs = index.train + index.test
    started = time.perf_counter()
    masks = dict(zip(pairs, load_masks(pairs, args.image_size, "multi-class", "resize")))
    print(f"loaded {len(pairs)} masks at {args.image_size} px in {time.perf_counter() - started:.2f} s")
    val_set = set(val)
    candidates = [masks[p] for p in val]
    extra = [masks[p] for p in index.train if p not in val_set]
    real_masks = [masks[p] for p in index.train]

    for by_pixels in (True, False):
        real = count_all(real_masks, num_classes, by_pixels).sum(0)
        for augment in (False, True):
            options = BalanceArgs(based_on_pixel_count=by_pixels, use_mask_augmentation=augment)
            started = time.perf_counter()
            result = balance(candidates, real, args.num_samples, num_classes, options, 0, names, extra)
            seconds = time.perf_counter() - started
            report = make_report(result, options, names, args.num_samples)
            print(f"\n{args.num_samples} masks from {len(candidates)} val masks, use_mask_augmentation {augment}: "
                  f"{seconds:.2f} s, {report['distinct_masks']} distinct masks ({report['augmented_masks']} "
                  f"augmented), reuse penalty {report['reuse_penalty']}")
            print("\n".join(format_table(report)))
            if result.warning:
                print(f"warning: {result.warning}")

    pool = [masks[p] for p in pairs]
    pool += [np.ascontiguousarray(m[:, ::-1]) for m in pool[: 1000 - len(pool)]]
    print(f"\ntiming: 1000 masks chosen among {len(pool)} candidates at {args.image_size} px (seed 0)")
    for by_pixels in (True, False):
        started = time.perf_counter()
        real = count_all(real_masks, num_classes, by_pixels).sum(0)
        counting = time.perf_counter() - started
        for augment in (False, True):
            options = BalanceArgs(based_on_pixel_count=by_pixels, use_mask_augmentation=augment)
            started = time.perf_counter()
            result = balance(pool, real, 1000, num_classes, options, 0, names)
            seconds = time.perf_counter() - started
            print(f"  by {'pixels' if by_pixels else 'objects'}, augmentation {augment}: {seconds:.2f} s "
                  f"(counting the {len(real_masks)} real masks {counting:.2f} s more), relative difference "
                  f"{result.achieved:.3f}")


if __name__ == "__main__":
    main()

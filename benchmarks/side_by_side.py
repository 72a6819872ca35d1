"""What `--jobs 2` gains on this CPU: the study's segmenter step (FPN + EfficientNet-Lite0, 128 px, batch 8) with
all threads, with 1 thread, and two 1-thread trainings side by side; prints seconds a step and the work per hour
of two side by side against one. Run it with nothing else running:

    python3 benchmarks/side_by_side.py [--steps 20]

The figures in docs/does_it_help.md ("Several units at once on one machine") came from this measurement."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_training(threads: int, steps: int) -> float:
    """Seconds a step of one segmenter training with `threads` threads (random images, 6 classes)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from evaluation.segmenter.model import SegmenterSpec, TrainSettings, train_segmenter

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (32, 128, 128, 3), dtype=np.uint8)
    masks = rng.integers(0, 6, (32, 128, 128), dtype=np.int64)
    spec = SegmenterSpec("fpn", 6, "tu-tf_efficientnet_lite0", "imagenet")
    started = time.perf_counter()
    train_segmenter(images, masks, spec, TrainSettings(steps=steps, batch_size=8, seed=0), progress=False)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one training with this many threads
    args = parser.parse_args()
    if args.child is not None:
        print(one_training(args.child, args.steps))
        return
    import torch

    command = [sys.executable, __file__, "--steps", str(args.steps), "--child"]
    threads = torch.get_num_threads()
    alone = float(subprocess.run([*command, str(threads)], capture_output=True, text=True, check=True).stdout)
    single = float(subprocess.run([*command, "1"], capture_output=True, text=True, check=True).stdout)
    pair = [subprocess.Popen([*command, "1"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    beside = [float(p.communicate()[0]) for p in pair]
    print(f"one training, {threads} threads: {alone:.3f} s a step")
    print(f"one training, 1 thread: {single:.3f} s a step")
    print(f"two 1-thread trainings side by side: {beside[0]:.3f} and {beside[1]:.3f} s a step")
    together = sum(1 / s for s in beside)
    print(f"work per hour, two side by side against one of {threads} threads: {together * alone:.2f}x")


if __name__ == "__main__":
    main()

"""Speed of the mask generator's network: its presence vector as a 1x1 condition against the same vector spread
over every pixel (the full-size SPADE convolutions the 1x1 path replaces).

    OMP_NUM_THREADS=2 python3 benchmarks/mask_generator_speed.py [--size 64] [--classes 6] [--batch-size 16]

The model is configs/config_masks.json's at --size px with --classes one-hot channels. Both conditions give the
same outputs (tests/test_mask_generator.py checks it); this script prints the seconds of a training step
(forward and backward, --batch-size masks) and of a sampling forward (--sample-batch masks, no gradients) for
each, and their ratio. Run it on an otherwise idle machine; figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guided_diffusion.masks.train import mask_config  # noqa: E402
from guided_diffusion.model_setup import build_model  # noqa: E402

CONFIG = REPO / "configs" / "config_masks.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="the masks' side (px)")
    parser.add_argument("--classes", type=int, default=6, help="number of classes (one-hot channels)")
    parser.add_argument("--batch-size", type=int, default=16, help="masks per training step")
    parser.add_argument("--sample-batch", type=int, default=4, help="masks per sampling forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each kind (after one warm-up)")
    args = parser.parse_args(argv)
    for option, value in (("--size", args.size), ("--classes", args.classes), ("--batch-size", args.batch_size),
                          ("--sample-batch", args.sample_batch), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    return args


def seconds(call, repeats: int) -> float:
    """Mean seconds of `call` over `repeats` calls, after one untimed call."""
    call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    values = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    values.update({"num_classes": args.classes, "image_size": args.size})
    config = mask_config(values, "mask_generator_speed")
    torch.manual_seed(0)
    model = build_model(config)
    x = torch.randn(args.batch_size, args.classes, args.size, args.size)
    t = torch.randint(0, 1000, (args.batch_size,))
    vectors = (torch.rand(args.batch_size, args.classes, 1, 1) > 0.5).float()
    conditions = {"1x1 presence vector": vectors,
                  "spread over every pixel": vectors.expand(-1, -1, args.size, args.size).contiguous()}

    print(f"mask generator network: {args.size} px, {args.classes} classes, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {torch.get_num_threads()} threads")
    print("| condition | training step (s) | sampling forward (ms) |")
    print("|---|---|---|")
    timed = {}
    for name, condition in conditions.items():
        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(x, t, condition).square().mean().backward()

        def forward() -> None:
            with torch.no_grad():
                n = args.sample_batch
                model(x[:n], t[:n], condition[:n])

        timed[name] = (seconds(step, args.repeats), seconds(forward, args.repeats))
        print(f"| {name} | {timed[name][0]:.2f} | {1000 * timed[name][1]:.0f} |", flush=True)
    (fast_step, fast_forward), (full_step, full_forward) = timed.values()
    print(f"\nthe 1x1 path: {full_step / fast_step:.2f}x the training steps/s, {full_forward / fast_forward:.2f}x "
          f"the sampling forwards/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

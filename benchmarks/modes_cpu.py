"""CPU time per image of each sampling mode (noise, variation, inpaint) at 32 px, and the README's inpainting grid.

    OMP_NUM_THREADS=1 python3 benchmarks/modes_cpu.py [--data ../shared/datasets/magnetic-tile]
        [--model CHECKPOINT_OR_RUN] [--train-steps 600] [--sampler ancestral] [--steps 50] [--num-samples 8]
        [--grid docs/inpaint_grid.png] [--root Results/modes_cpu]

Without --model it first trains a small model (the tests' 32 px / 32-channel UNet, 6 classes, null-label dropout
0.1 so that guidance works) on magnetic-tile for --train-steps steps. Then it samples --num-samples images in each
mode through `run_sampling` (guidance s = 1.5, the same sampler and steps; variation at strength 0.6; inpaint with
the defaults: margin 2 px, 2 resampling jumps per step, masks from the held-out split on the defect-free train
tiles) and prints the seconds per image of each run as its summary.json measured them (model time and file
writing; not the model loading). The grid shows background | mask | result for the first inpainted images, each
cell enlarged 4x (nearest) so that 32 px stay visible. Every run goes into a fresh folder under --root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guided_diffusion.config import config_from_dict  # noqa: E402
from guided_diffusion.run_folder import colorize  # noqa: E402
from guided_diffusion.sampling.sample import run_sampling  # noqa: E402
from guided_diffusion.samplers import SAMPLERS  # noqa: E402
from guided_diffusion.train import Trainer  # noqa: E402

SMALL_MODEL = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
               "attention_resolutions": "16", "num_head_channels": 32}
MODES = {"noise": {}, "variation": {"mode": "variation", "strength": 0.6}, "inpaint": {"mode": "inpaint"}}
CELL_SCALE = 4
SEPARATOR = 2


def train_small_model(data: Path, root: Path, steps: int) -> Path:
    values = {"data_dir": str(data), "num_classes": 6, "root_log_dir": str(root / "train"), "batch_size": 8,
              "lr": 5e-4, "max_epochs": 10_000, "max_steps": steps, "save_interval": steps, "log_interval": 50,
              "drop_rate": 0.1, "ema_rate": 0.999, "device": "cpu", **SMALL_MODEL}
    config, _ = config_from_dict("train", values)
    return Trainer(config, "train", log=print).run().run_dir


def write_inpaint_grid(run_dir: Path, path: Path, rows: int, num_classes: int) -> None:
    """background | mask (colours) | result for the first `rows` images of an inpainting run."""
    names = sorted(p.name for p in (run_dir / "samples").glob("*.png"))[:rows]

    def cell(array: np.ndarray) -> np.ndarray:
        return np.kron(array, np.ones((CELL_SCALE, CELL_SCALE, 1), np.uint8))

    lines = []
    for name in names:
        background = np.asarray(Image.open(run_dir / "images" / name).convert("RGB"))
        mask = colorize(np.asarray(Image.open(run_dir / "labels" / name)), num_classes)
        result = np.asarray(Image.open(run_dir / "samples" / name).convert("RGB"))
        cells = [cell(background), cell(mask), cell(result)]
        gap = np.full((cells[0].shape[0], SEPARATOR, 3), 255, np.uint8)
        lines.append(np.concatenate([cells[0], gap, cells[1], gap, cells[2]], axis=1))
        lines.append(np.full((SEPARATOR, lines[-1].shape[1], 3), 255, np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(lines[:-1], axis=0)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "magnetic-tile"))
    parser.add_argument("--model", default="", help="checkpoint or run folder; default: train a small model")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--sampler", default="ancestral", choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grid", default=str(REPO / "docs" / "inpaint_grid.png"))
    parser.add_argument("--grid-rows", type=int, default=6)
    parser.add_argument("--root", default=str(REPO / "Results" / "modes_cpu"))
    args = parser.parse_args()
    root = Path(args.root)
    model = Path(args.model) if args.model else train_small_model(Path(args.data), root, args.train_steps)

    figures = {}
    for mode, keys in MODES.items():
        values = {"data_dir": args.data, "model_path": str(model), "root_log_dir": str(root / mode),
                  "num_samples": args.num_samples, "batch_size": args.batch_size, "sampler": args.sampler,
                  "steps": args.steps, "s": 1.5, "device": "cpu", **keys}
        config, _ = config_from_dict("sample", values)
        summary = run_sampling(config, given=set(values), log=print)
        figures[mode] = summary
        if mode == "inpaint":
            write_inpaint_grid(Path(summary["run_dir"]), Path(args.grid), args.grid_rows, config.num_classes or 6)

    print(f"\nCPU, {torch.get_num_threads()} thread(s), 32 px, {args.sampler} {args.steps} steps, guidance s = 1.5, "
          f"batch {args.batch_size}, {args.num_samples} images per mode, model {model}")
    print(f"{'mode':<10} {'steps run':>9} {'model evaluations / image':>26} {'s / image':>10}")
    for mode, summary in figures.items():
        steps_run = summary.get("steps_run", summary["steps"])
        jumps = summary.get("resample_steps", 0)
        evaluations = steps_run + jumps * (steps_run - 1)
        print(f"{mode:<10} {steps_run:>9} {evaluations:>26} {summary['seconds_per_image']:>10.3f}")
    print(f"grid: {args.grid}")
    print(json.dumps({mode: s["run_dir"] for mode, s in figures.items()}))


if __name__ == "__main__":
    main()

"""Colour and brightness casts of the SDM's samples on RGB data, with and without offset noise (issue 14's lever).

    python benchmarks/colour_cast.py                                  # a generated demo dataset of 200 images, 32 px
    python benchmarks/colour_cast.py --data-dir datasets/<name> --image-size 64 --train-steps 2000

For each `--offset-noise` value one SDM is trained with `main.py train` (same seed, same data, only that key
changed), then `main.py sample` draws `--num-samples` images (DPM-Solver++(2M), no guidance) for the dataset's
masks. Each image is reduced to its mean colour (R, G, B on 0..255). Printed per row, the real train images first:
- `mean R G B`: the mean over images of the image means; a cast is a sample row that differs from the real one;
- `brightness spread`: the standard deviation over images of the mean grey level (offset noise is meant to let
  the model reproduce the real spread: the linear schedule leaves a trace of each image's mean in x_T);
- `tint`: the mean over images of the mean |channel - grey| of the image mean colour (how coloured images are);
- `colour FD`: the Frechet distance between Gaussians fitted to the real and the sampled mean colours (0 = the same
  distribution of image colours; in squared grey levels). The row "even vs odd" compares two halves of the real
  images: a sample row near it is as close to the real colours as the real images are to each other;
- train and sample seconds.
Run folders go under `--work-dir` (a fresh temporary folder by default); nothing in the project is written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guided_diffusion.data import IMAGE_EXTENSIONS  # noqa: E402
from guided_diffusion.run_folder import latest_run_dir  # noqa: E402


def mean_colours(folder: Path, size: int) -> np.ndarray:
    """(N, 3) mean R, G, B on 0..255 of every image in `folder`, each resized to size x size first (as training
    sees it); grey images count as R = G = B."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"error: no images in {folder}")
    means = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float64)
             .reshape(-1, 3).mean(axis=0) for p in files]
    return np.stack(means)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of a and of b (both (N, d))."""
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # trace of sqrt(cov_a cov_b) from the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a), which are real and >= 0
    values, vectors = np.linalg.eigh(cov_a)
    root_a = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def describe(colours: np.ndarray) -> dict[str, float]:
    grey = colours.mean(axis=1)
    return {"r": colours[:, 0].mean(), "g": colours[:, 1].mean(), "b": colours[:, 2].mean(),
            "spread": grey.std(), "tint": np.abs(colours - grey[:, None]).mean()}


def run_main(action: str, config: Path, sets: dict[str, object], log: Path) -> float:
    """`main.py <action>` with --set overrides; its output goes to `log`. Returns the wall time in seconds."""
    command = [sys.executable, str(ROOT / "main.py"), action, "-c", str(config)]
    for key, value in sets.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: main.py {action} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def newest_run(root: Path, action: str) -> Path:
    run = latest_run_dir(root, action)
    if run is None:
        raise SystemExit(f"error: no {action} run under {root}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="", help="an RGB dataset folder; default: the demo dataset, generated "
                        "into the work folder")
    parser.add_argument("--num-classes", type=int, default=4, help="classes incl. background (demo: 4)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--offset-noise", default="0,0.1", help="comma-separated values, one SDM each")
    parser.add_argument("--work-dir", default="", help="where runs go (default: a new temporary folder)")
    args = parser.parse_args()
    try:
        offsets = [float(value) for value in args.offset_noise.split(",")]
    except ValueError:
        parser.error(f"--offset-noise: expected comma-separated numbers, got {args.offset_noise!r}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="colour_cast_"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else work / "demo"
    if not args.data_dir and not (data_dir / "train").is_dir():
        subprocess.run([sys.executable, "-m", "guided_diffusion.demo", str(data_dir), "--num-train", "200"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    common = {"data_dir": str(data_dir.resolve()), "image_size": args.image_size, "seed": 0, "batch_size": 8}
    model = {"num_classes": args.num_classes, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
             "attention_resolutions": "16", "num_head_channels": 32, "image_channels": 3, "precision": "auto"}
    real = mean_colours(data_dir / "train" / "images", args.image_size)
    halves = real[0::2], real[1::2]
    rows = [("real train images", describe(real), 0.0, "-", "-"),
             ("real: even vs odd images (the FD's noise floor)", describe(halves[1]), frechet_distance(*halves),
              "-", "-")]
    for value in offsets:
        root = work / f"offset_{value:g}"
        root.mkdir(exist_ok=True)
        train_s = run_main("train", ROOT / "configs" / "demo" / "config_train.json",
                           {**common, **model, "root_log_dir": str(root), "offset_noise": value, "lr": 3e-4,
                            "max_steps": args.train_steps, "max_epochs": 100000, "save_interval": args.train_steps,
                            "log_interval": 50, "lr_warmup_steps": 100}, root / "train.log")
        sample_s = run_main("sample", ROOT / "configs" / "demo" / "config_sample.json",
                            {**common, "root_log_dir": str(root), "model_path": str(newest_run(root, "train")),
                             "num_samples": args.num_samples, "mask_split": "all", "s": 1.0, "sampler": "dpm++2m",
                             "steps": args.sample_steps, "num_classes": args.num_classes}, root / "sample.log")
        colours = mean_colours(newest_run(root, "sample") / "samples", args.image_size)  # images/ holds the real ones
        rows.append((f"offset_noise {value:g}", describe(colours), frechet_distance(real, colours),
                     f"{train_s:.0f}", f"{sample_s:.0f}"))
    print(f"data {data_dir} ({len(real)} train images), {args.image_size} px, {args.train_steps} training steps, "
          f"{args.num_samples} samples each; runs in {work}")
    print("| images | mean R G B | brightness spread | tint | colour FD | train s | sample s |")
    print("|---|---|---|---|---|---|---|")
    for name, stats, distance, train_s, sample_s in rows:
        print(f"| {name} | {stats['r']:.1f} {stats['g']:.1f} {stats['b']:.1f} | {stats['spread']:.1f} | "
              f"{stats['tint']:.1f} | {distance:.1f} | {train_s} | {sample_s} |")


if __name__ == "__main__":
    main()

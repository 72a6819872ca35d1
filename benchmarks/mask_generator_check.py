"""Does the mask generator make masks like the dataset's, and new ones? Figures for docs/mask_generator.md.

    OMP_NUM_THREADS=2 python3 benchmarks/mask_generator_check.py [--data ../shared/datasets/magnetic-tile]
        [--size 64 [--crop-size 32]] [--steps 1500] [--samples 200] [--out DIR] [--sdm RUN [--image-size 128]]
        [--trained RUN | --resume RUN]

1. The dataset's train/ masks are split into a training part and a held-out real part (15 %, seeded).
2. A mask generator (`main.py masks`, the keys of configs/config_masks.json at --size px) trains on the training
   part only, for --steps steps (--trained: a run of this script is sampled as it is; --resume: a shorter run of
   this script is trained on to --steps, an exact resume).
3. It samples --samples masks with no class asked, and --samples asked to hold the rarest class (the
   non-background class held by the fewest training masks).
4. `masks_report.mask_report` compares the generated masks with the training part, and, as the yardstick, the
   held-out real masks with the same training part: what two real sets of this dataset differ by. The
   generator is close when its distances are near the yardstick's; a generator that copies its training masks
   shows near-copies (IoU > 0.9) far above the held-out masks' own share. With --min-area the real masks (training
   and held-out) are cleaned as the generated ones were (before 2026-12-03 they were not: the tables of
   docs/mask_generator.md up to then compare cleaned generated masks with uncleaned real ones).
5. One Markdown table is printed; the two reports (JSON), the masks (masks.npz) and pictures of generated masks
   go to --out.
6. With --sdm (an image model's run folder of the same classes), `main.py sample` paints images for 8 generated
   masks at --image-size: its grid.png (mask | synthetic) is copied to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guided_diffusion.balance import load_masks  # noqa: E402
from guided_diffusion.config import MaskTrainConfig, config_from_dict  # noqa: E402
from guided_diffusion.data import index_dataset, read_class_names, split_train_val  # noqa: E402
from evaluation.image_sets import infer_num_classes, link_subset  # noqa: E402
from guided_diffusion.masks.model import (load_mask_generator, presence_misses, presence_vectors,  # noqa: E402
                                          sample_masks, with_legacy_keys)
from guided_diffusion.masks.report import mask_report, remove_small_components  # noqa: E402
from guided_diffusion.errors import ConfigError  # noqa: E402
from guided_diffusion.masks.train import mask_config, train_mask_generator  # noqa: E402
from guided_diffusion.run_folder import palette  # noqa: E402

CONFIG = REPO / "configs" / "config_masks.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "magnetic-tile"))
    parser.add_argument("--dataset-mode", default="multi-class")
    parser.add_argument("--size", type=int, default=64, help="the masks' side (px)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the mask generator")
    parser.add_argument("--crop-size", type=int, default=0,
                        help="train on random crops of this side of the --size masks, sample at --size (0 = off)")
    parser.add_argument("--class-weight-power", type=float, default=MaskTrainConfig.class_weight_power,
                        help="the generator's class_weight_power (rare classes' pixels weighted up; 0 = off)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (bf16 where native)")
    parser.add_argument("--prediction", default=MaskTrainConfig.prediction, choices=["eps", "v"],
                        help="what the generator predicts")
    parser.add_argument("--samples", type=int, default=200, help="masks sampled, unasked and asked each")
    parser.add_argument("--sample-steps", type=int, default=25, help="ancestral sampler steps per mask")
    parser.add_argument("--guidance", type=float, default=2.0, help="mask guidance when a class is asked")
    parser.add_argument("--plain-guidance", type=float, default=1.0,
                        help="mask guidance of the masks no class is asked for (toward the presence vector drawn "
                             "for each; the sample key mask_guidance)")
    parser.add_argument("--min-area", type=int, default=0, help="mask_min_area of the sampled masks")
    parser.add_argument("--retries", type=int, default=0,
                        help="mask_retries: redraw a mask whose classes differ from its presence vector up to this "
                             "many times")
    parser.add_argument("--held-out", type=float, default=0.15, help="share of train/ masks held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="folder for the reports and pictures (default: a temporary one)")
    parser.add_argument("--sdm", default="", help="an image model's run folder: paint 8 generated masks")
    parser.add_argument("--image-size", type=int, default=128, help="the image model's size (with --sdm)")
    parser.add_argument("--trained", default="", help="a masks run this script trained before with the same --data, "
                                                     "--held-out, --size, --seed, --steps and --batch-size: sample "
                                                     "it, do not train again")
    parser.add_argument("--resume", default="", help="a masks run this script trained before with the same --data, "
                                                    "--held-out, --size, --seed and --batch-size, for fewer steps: "
                                                    "train it on to --steps (exact resume: as one run of --steps)")
    args = parser.parse_args(argv)
    if args.trained and args.resume:
        parser.error("give --trained or --resume, not both")
    for option, scale in (("--guidance", args.guidance), ("--plain-guidance", args.plain_guidance)):
        if not scale >= 1.0:  # checked here, before minutes of training, in argparse's one line
            parser.error(f"{option} is a guidance scale and must be >= 1 (1 = none), got {scale:g}")
    if args.retries < 0:
        parser.error(f"--retries must be >= 0 (0 = off), got {args.retries}")
    return args


def check_trained(run_dir: Path, args: argparse.Namespace, option: str = "--trained") -> Path:
    """A masks run of this script (--trained, or --resume to train it on): its size, seed, batch size and (for
    --trained) steps must be this call's, with fewer steps for --resume, so that it trained on this call's
    training part (the split is seeded) as the table says (--data and --held-out are not recorded in the run: the
    caller keeps them the same)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{option} {run_dir}: no readable config.json of a masks run ({error})")
    checked = [("image_size", args.size), ("seed", args.seed), ("batch_size", args.batch_size),
               ("prediction", args.prediction), ("crop_size", args.crop_size),
               ("class_weight_power", args.class_weight_power)]
    config = with_legacy_keys(config)  # runs from before a key trained with its old value
    for key, wanted in checked + ([("max_steps", args.steps)] if option == "--trained" else []):
        if config.get(key) != wanted:
            raise SystemExit(f"{option} {run_dir}: its {key} is {config.get(key)!r}, this call's is {wanted!r}")
    steps = config.get("max_steps")
    if option == "--resume" and not (isinstance(steps, int) and steps < args.steps):
        raise SystemExit(f"--resume {run_dir}: it trained {steps!r} steps, not fewer than --steps {args.steps}")
    return run_dir


def mask_picture(masks: np.ndarray, num_classes: int, columns: int = 10, rows: int = 4) -> Image.Image:
    """The first columns x rows masks in the palette colours, 2 px apart."""
    colours = palette(num_classes)
    size = masks.shape[1]
    canvas = np.full((rows * (size + 2), columns * (size + 2), 3), 255, np.uint8)
    for i, mask in enumerate(masks[:columns * rows]):
        r, c = divmod(i, columns)
        canvas[r * (size + 2):r * (size + 2) + size, c * (size + 2):c * (size + 2) + size] = colours[mask]
    return Image.fromarray(canvas)


def distances(report: dict, names: list[str]) -> dict[str, float | None]:
    """The report's figures of closeness: total variation of pixel shares and of holding shares, mean W1 of
    object sizes over the classes both sides hold, background-only share, near-copy share and mean nearest IoU
    (of the masks that hold a class other than the background), speckle share."""
    pixel, holding = report["pixel_share"], report["holding_share"]
    w1 = [report["object_sizes"]["classes"][n]["w1_log10_size"] for n in names[1:]]
    w1 = [v for v in w1 if v is not None]
    return {
        "pixel_share_tv": 0.5 * float(np.abs(np.subtract(pixel["generated"], pixel["real"])).sum()),
        "holding_share_mean_abs": float(np.abs(np.subtract(holding["generated"], holding["real"]))[1:].mean()),
        "w1_log10_size_mean": float(np.mean(w1)) if w1 else None,
        "background_only_share": report["novelty"]["background_only_share"]["generated"],
        "near_copy_share": report["novelty"]["near_copy_share"],
        "mean_nearest_iou": report["novelty"]["mean_iou"],
        "speckle_share": report["validity"]["speckle_share_generated"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="mask_check_"))
    out.mkdir(parents=True, exist_ok=True)
    num_classes = infer_num_classes(None, args.dataset_mode, args.data, [], "--data")
    index = index_dataset(args.data, args.dataset_mode, num_classes, require_test=False)
    names = read_class_names(args.data, num_classes)
    training, held_out = split_train_val(index.train, args.held_out, args.seed)
    work = Path(tempfile.mkdtemp(prefix="mask_check_data_"))
    data_dir = link_subset(training, work / "data", args.data)
    real_train = np.stack(load_masks(training, args.size, args.dataset_mode, "resize")).astype(np.int64)
    real_held = np.stack(load_masks(held_out, args.size, args.dataset_mode, "resize")).astype(np.int64)
    holding = (np.stack([np.bincount(m.ravel(), minlength=num_classes) for m in real_train]) > 0).mean(0)
    rare = int(np.argmin(np.where(np.arange(num_classes) == 0, np.inf, np.where(holding > 0, holding, np.inf))))
    print(f"{len(training)} training masks, {len(held_out)} held out, {num_classes} classes; rarest class "
          f"{rare} {names[rare]} (held by {100 * holding[rare]:.1f}% of the training masks)", flush=True)

    values = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    values.update({"data_dir": str(data_dir), "dataset_mode": args.dataset_mode, "num_classes": num_classes,
                   "image_size": args.size, "root_log_dir": str(out / "runs"), "batch_size": args.batch_size,
                   "max_epochs": 100000, "max_steps": args.steps, "save_interval": max(1, args.steps // 3),
                   "seed": args.seed, "precision": args.precision, "prediction": args.prediction,
                   "crop_size": args.crop_size, "class_weight_power": args.class_weight_power})
    try:  # the options that become generator keys (--crop-size, --class-weight-power, ...): one line, before work
        mask_config(values, "mask_generator_check")
    except ConfigError as error:
        raise SystemExit(str(error))
    if args.trained:
        run_dir, train_seconds = check_trained(Path(args.trained), args), None
    else:
        if args.resume:
            values["resume_checkpoint"] = str(check_trained(Path(args.resume), args, "--resume"))
        started = time.perf_counter()
        run_dir = train_mask_generator(values, log=lambda *_: None).run_dir
        train_seconds = time.perf_counter() - started
    generator = load_mask_generator(run_dir)

    started = time.perf_counter()
    plain = sample_masks(generator, args.samples, seed=args.seed, steps=args.sample_steps, min_area=args.min_area,
                         guidance_scale=args.plain_guidance, retries=args.retries, log=print)
    sample_seconds = time.perf_counter() - started
    asked = sample_masks(generator, args.samples, seed=args.seed + 1, required_classes=[rare],
                         guidance_scale=args.guidance, steps=args.sample_steps, min_area=args.min_area,
                         retries=args.retries, log=print)
    matched = float(np.mean(presence_misses(plain, presence_vectors(generator, args.samples, args.seed)) == 0))
    holds_rare = float(np.mean([(m == rare).any() for m in asked]))
    report_kwargs = {"class_names": names, "min_area": max(args.min_area, 4), "clean_real_below": args.min_area}
    if args.min_area > 1:  # the real sets are cleaned as the generated masks were, so sizes compare like with like
        real_held = np.stack([remove_small_components(m, args.min_area) for m in real_held])
    generated_report = mask_report(list(plain), list(real_train), num_classes, **report_kwargs)
    held_report = mask_report(list(real_held), list(real_train), num_classes, **report_kwargs)
    (out / "generated_vs_train.json").write_text(json.dumps(generated_report))
    (out / "held_out_vs_train.json").write_text(json.dumps(held_report))
    np.savez_compressed(out / "masks.npz", generated=plain, asked=asked, held_out=real_held)
    mask_picture(plain, num_classes).save(out / "generated_masks.png")
    mask_picture(real_held, num_classes).save(out / "held_out_masks.png")
    mask_picture(asked, num_classes).save(out / f"generated_masks_{names[rare]}.png")

    gen, held = distances(generated_report, names), distances(held_report, names)
    trained = (f"reused from {run_dir}" if train_seconds is None else
               f"in {train_seconds / 60:.1f} min ({args.steps * args.batch_size / train_seconds:.1f} masks/s)")
    crops = f" (trained on {args.crop_size} px crops)" if args.crop_size else ""
    crops += f", class_weight_power {args.class_weight_power:g}"
    print(f"\nmask generator: {args.size} px{crops}, {args.prediction} prediction, {args.steps} steps of batch "
          f"{args.batch_size} ({args.precision}) "
          f"{trained}; sampling {args.sample_steps} ancestral steps (guidance {args.plain_guidance:g}): "
          f"{sample_seconds / args.samples:.2f} s/mask\n")
    print(f"mask_retries {args.retries}: {100 * matched:.0f}% of the unasked masks hold exactly the classes of "
          f"their presence vector\n")
    if args.min_area > 1:
        print(f"real masks (training and held-out) cleaned as the generated ones: components under {args.min_area} "
              f"px filled\n")
    print("| against the training masks | generated | held-out real |")
    print("|---|---|---|")
    labels = {"pixel_share_tv": "pixel shares, total variation", "holding_share_mean_abs":
              "share of masks holding a class, mean abs. difference", "w1_log10_size_mean":
              "object sizes, mean W1 of log10 size", "background_only_share": "masks of background only",
              "near_copy_share": "near-copies (IoU > 0.9 with a training mask), of the masks with a defect",
              "mean_nearest_iou": "mean IoU with the nearest training mask, same masks", "speckle_share":
              f"speckles (components < {report_kwargs['min_area']} px)"}
    for key, label in labels.items():
        a, b = gen[key], held[key]
        print(f"| {label} | {'—' if a is None else f'{a:.3f}'} | {'—' if b is None else f'{b:.3f}'} |")
    print(f"\nper class (pixel share generated / held-out / train; masks holding it):")
    for k, name in enumerate(names):
        print(f"  {k} {name}: {100 * generated_report['pixel_share']['generated'][k]:.2f}% / "
              f"{100 * held_report['pixel_share']['generated'][k]:.2f}% / "
              f"{100 * generated_report['pixel_share']['real'][k]:.2f}%; "
              f"{100 * generated_report['holding_share']['generated'][k]:.0f}% / "
              f"{100 * held_report['holding_share']['generated'][k]:.0f}% / "
              f"{100 * generated_report['holding_share']['real'][k]:.0f}%; W1 size generated "
              f"{generated_report['object_sizes']['classes'][name]['w1_log10_size']}, held-out "
              f"{held_report['object_sizes']['classes'][name]['w1_log10_size']}")
    print(f"\nasked for {names[rare]} (guidance {args.guidance:g}): {100 * holds_rare:.1f}% of {args.samples} masks "
          f"hold it; unasked {100 * generated_report['holding_share']['generated'][rare]:.1f}%, training masks "
          f"{100 * holding[rare]:.1f}%")

    if args.sdm:
        sample_values = {"data_dir": str(data_dir), "dataset_mode": args.dataset_mode, "num_classes": num_classes,
                         "image_size": args.image_size, "model_path": args.sdm, "mask_source": str(run_dir),
                         "num_samples": 8, "batch_size": 8, "sampler": "dpm++2m", "steps": 15, "s": 1.5,
                         "mask_steps": args.sample_steps,  # the same area at the image size as --min-area here
                         "mask_min_area": args.min_area * round((args.image_size / args.size) ** 2),
                         "root_log_dir": str(out / "painted"), "seed": args.seed}
        config, _ = config_from_dict("sample", sample_values, "mask_generator_check --sdm")
        from guided_diffusion.sampling.sample import run_sampling
        summary = run_sampling(config, set(sample_values), "mask_generator_check --sdm", lambda *_: None)
        shutil.copyfile(Path(summary["run_dir"]) / "grid.png", out / "generated_masks_painted.png")
    print(f"\nfiles: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of `evaluation/filter.sh` (also `python3 -m evaluation.filter`): FreeMask filtering of sample runs.

    evaluation/filter.sh --data-dir datasets/tiles --samples Results/tiles/sample_001 --allow-training
    evaluation/filter.sh --data-dir datasets/tiles --scorer-image-size 256 --allow-training   # the scorer only

A scorer segmenter trained on the dataset's real train split (cached in --scorer-dir) scores every synthetic
pair; each sample folder gets labels_filtered/ (255 = ignored pixels), filter.json (with the images to drop) and
filter.png. `evaluation/evaluate.sh --synthetic-labels filtered` then trains on them. A mistake in the input
prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from guided_diffusion.config import DEFAULT_SCORER_DIR  # the default of hardness_args.scorer_dir too
from guided_diffusion.data import canonical_dataset_mode
from guided_diffusion.errors import ConfigError, exit_status

PROG = "evaluation/filter.sh"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ignore badly synthesised pixels (loss of a segmenter trained on the real data far above "
                    "their class's usual loss) and drop images with too many of them: writes labels_filtered/, "
                    "filter.json and filter.png into each sample run folder.")
    parser.add_argument("--data-dir", required=True, help="dataset with train/ (the scorer's training data)")
    parser.add_argument("--samples", nargs="+", default=[], metavar="DIR",
                        help="sample run folders (or folders of sample_NNN runs: the newest); none = only train "
                             "or check the scorer")
    parser.add_argument("--scorer-dir", default=DEFAULT_SCORER_DIR,
                        help="where scorers are cached, keyed by dataset hash + settings (default "
                             f"{DEFAULT_SCORER_DIR})")
    parser.add_argument("--allow-training", action="store_true",
                        help="train the scorer when the cache has none (else that is an error)")
    parser.add_argument("--k", type=float, default=1.0,
                        help="ignore a pixel when its loss > class mean + k x class std (default 1.0)")
    parser.add_argument("--max-ignored-fraction", type=float, default=0.5,
                        help="drop an image whose ignored fraction exceeds this (default 0.5; 1 = drop none)")
    parser.add_argument("--drop-basis", choices=["foreground", "all"], default="foreground",
                        help="the ignored fraction of an image over the pixels labelled with a class other than 0 "
                             "(default; an image without such pixels is never dropped) or over all its pixels")
    parser.add_argument("--dataset-mode", default="multi-class", help="multi-class or binary")
    parser.add_argument("--num-classes", type=int, help="default: binary -> 2, else classes.json, else the "
                                                        "sample folder's config.json")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    scorer = parser.add_argument_group("scorer (part of the cache key)")
    scorer.add_argument("--scorer-architecture", default="fpn", help="unetplusplus, fpn, deeplabv3plus, unet")
    scorer.add_argument("--scorer-encoder", default="resnet18", help="smp encoder, random init (default resnet18)")
    scorer.add_argument("--scorer-image-size", type=int,
                        help="default: each sample folder's image size (required without --samples)")
    scorer.add_argument("--scorer-resize-mode", default="resize", help="resize or crop, for the real images")
    scorer.add_argument("--scorer-steps", type=int, default=1000)
    scorer.add_argument("--scorer-batch-size", type=int, default=8)
    scorer.add_argument("--scorer-lr", type=float, default=1e-3)
    scorer.add_argument("--scorer-weight-decay", type=float, default=1e-4)
    scorer.add_argument("--scorer-augment", choices=["true", "false"], default="true", help="random flips")
    scorer.add_argument("--scorer-seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar while the scorer trains")
    return parser.parse_args(argv)


def _num_classes(args: argparse.Namespace) -> int:
    from .image_sets import infer_num_classes

    return infer_num_classes(args.num_classes, args.dataset_mode, args.data_dir, args.samples, "--num-classes")


def run(args: argparse.Namespace) -> None:
    from guided_diffusion.model_setup import select_device

    from .freemask import FilterSettings, ScorerSettings, filter_folders, load_or_train_scorer
    from .image_sets import index_sample_folder

    mode = canonical_dataset_mode(args.dataset_mode)
    settings = FilterSettings(args.k, args.max_ignored_fraction, args.drop_basis)
    scorer_settings = ScorerSettings.from_dict({
        "architecture": args.scorer_architecture, "encoder": args.scorer_encoder,
        "image_size": args.scorer_image_size, "resize_mode": args.scorer_resize_mode, "steps": args.scorer_steps,
        "batch_size": args.scorer_batch_size, "lr": args.scorer_lr, "weight_decay": args.scorer_weight_decay,
        "augment": args.scorer_augment == "true", "seed": args.scorer_seed}, "scorer")
    num_classes = _num_classes(args)
    folders = [index_sample_folder(path, num_classes) for path in args.samples]
    device = select_device(args.device)
    if not folders:
        if scorer_settings.image_size is None:
            raise ConfigError("--scorer-image-size is required without --samples (there is no sample size to "
                              "take it from)")
        scorer = load_or_train_scorer(args.data_dir, mode, num_classes, scorer_settings, args.scorer_dir,
                                      args.allow_training, device, progress=not args.no_progress)
        print(f"scorer ready: {scorer.folder}")
        return
    filter_folders(folders, args.data_dir, mode, num_classes, scorer_settings, settings, args.scorer_dir,
                   args.allow_training, device, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

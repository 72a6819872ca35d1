"""Command line of `evaluation/evaluate.sh` (also `python3 -m evaluation`): options or a JSON config, or both.

A mistake in the user's input prints one line `error: ...` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from guided_diffusion.config import parse_override
from guided_diffusion.config_io import read_config_file
from guided_diffusion.errors import exit_status

from .config import config_from_dict, config_to_dict

PROG = "evaluation/evaluate.sh"

# command-line option -> config key, for the options that have their own flag
_OPTIONS: dict[str, str] = {
    "data_dir": "data_dir", "samples": "sample_dirs", "mixes": "mixes", "seeds": "seeds", "models": "models",
    "encoder": "encoder", "encoder_weights": "encoder_weights", "dataset_mode": "dataset_mode",
    "num_classes": "num_classes", "image_size": "image_size", "resize_mode": "resize_mode",
    "batch_size": "batch_size", "steps": "steps", "lr": "lr", "device": "device", "root_log_dir": "root_log_dir",
    "inception_weights": "inception_weights", "synthetic_labels": "synthetic_labels",
    "background_class": "background_class", "ignore_index": "ignore_index",
}


def _class_or_none(text: str) -> int | str:
    """An integer option that also takes 'none'/'null' (kept as the string 'none' until resolve_values)."""
    if text.strip().lower() in ("none", "null"):
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train segmenters on real + synthetic mixes (R<real>F<synthetic>) and test them on the real "
                    "test split: does synthetic data raise mIoU?",
        epilog="Every config key can also be set with --set key=value (value read as JSON). Example: "
               f"{PROG} --data-dir datasets/tiles --samples Results/tiles/sample_001 --mixes RALLF000 RALLF200",
    )
    parser.add_argument("-c", "--config", help="JSON config with the keys of configs/config_evaluate.json")
    parser.add_argument("--data-dir", help="dataset folder with train/ and test/ (images/, masks/)")
    parser.add_argument("--samples", nargs="+", metavar="DIR",
                        help="sample run folders (samples/ + labels/), or folders of sample_NNN runs (newest used)")
    parser.add_argument("--mixes", nargs="+", metavar="MIX", help="e.g. RALLF000 RALLF200 R100F300 FALL")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="N")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="unetplusplus, fpn, deeplabv3plus, unet")
    parser.add_argument("--encoder", help="smp encoder name (default resnet18)")
    parser.add_argument("--encoder-weights", metavar="FILE",
                        help="imagenet, or a local encoder weights file (default: random init)")
    parser.add_argument("--dataset-mode", help="multi-class or binary")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--resize-mode", help="resize or crop")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (the same for every mix)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--root-log-dir", help="where the evaluate_NNN run folder is made (default Results)")
    parser.add_argument("--inception-weights", metavar="FILE", help="local Inception-v3 weights: adds FID/KID")
    parser.add_argument("--synthetic-labels", choices=["raw", "filtered"],
                        help="train on labels/ (raw, default) or on labels_filtered/ of evaluation/filter.sh "
                             "(255 = ignored pixels, dropped images left out)")
    parser.add_argument("--background-class", type=_class_or_none, metavar="ID|none",
                        help="class left out of the 'without background' means (default 0; none = no background "
                             "class, e.g. scene datasets whose class 0 is sky or road)")
    parser.add_argument("--ignore-index", type=_class_or_none, metavar="VALUE|none",
                        help="label value the losses and metrics skip, e.g. 255 for void/unlabelled (default none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set label_alignment=false")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def resolve_values(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The config's key: value pairs (file, then options, then --set) and a name for messages."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for option, key in _OPTIONS.items():
        given = getattr(args, option)
        if given is not None:
            values[key] = None if given == "none" else given
    for text in args.overrides:
        key, value = parse_override(text)
        values[key] = value
    return values, args.config or "command line"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def action() -> None:
        values, source = resolve_values(args)
        config = config_from_dict(values, source)
        if args.dry_run:
            print(json.dumps(config_to_dict(config), indent=2))
            return
        from .pipeline import run_evaluation  # noqa: PLC0415 - keeps --help and --dry-run fast

        run_evaluation(config, command=shlex.join([PROG, *argv]))

    return exit_status(action)

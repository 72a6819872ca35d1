"""What watching training costs: runs with TensorBoard and previews at their defaults against runs without them.

    python benchmarks/watch_overhead.py                         # tiny SDM, 32 px, generated demo data, 500 steps
    python benchmarks/watch_overhead.py --steps 2000 --image-size 64 --channels 64 --pairs 5

Issue 36 asks that TensorBoard logging and previews slow training by less than 5 % at the default
`preview_interval`. Each pair trains the same run twice in this process: "off" (`tensorboard: false`,
`preview_interval: 0`) and "watched" (`tensorboard: true`, `preview_interval` "auto" unless --preview-interval
says otherwise), the two in alternating order from pair to pair. The table gives each pair's wall times of
`Trainer.run()` and the watched run's overhead, and the seconds of the previews themselves (TensorBoard's
`preview/seconds`) as a share of the watched run: that share does not depend on how busy the machine was between
the two runs, the overhead does. The once-per-process import of TensorBoard is done and timed before the pairs.
Figures, not pass/fail; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion import watch  # noqa: E402
from guided_diffusion.config import config_from_dict  # noqa: E402
from guided_diffusion.demo import make_demo_dataset  # noqa: E402
from guided_diffusion.train import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps of each run")
    parser.add_argument("--pairs", type=int, default=3, help="(off, watched) pairs of runs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32, help="the UNet's num_channels (a multiple of 32)")
    parser.add_argument("--images", type=int, default=40, help="training images of the generated demo data")
    parser.add_argument("--log-interval", type=int, default=10, help="training's log_interval (its default: 10)")
    parser.add_argument("--preview-interval", default="auto", help='"auto" (the default) or a number of steps')
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = parser.parse_args(argv)
    if args.preview_interval != "auto":
        try:
            args.preview_interval = int(args.preview_interval)
        except ValueError:
            parser.error(f"--preview-interval: expected \"auto\" or a number of steps, got {args.preview_interval!r}")
        if args.preview_interval < 1:
            parser.error("--preview-interval must be at least 1 (0 would watch nothing but TensorBoard)")
    for name in ("steps", "pairs", "batch_size", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.images < args.batch_size + 1:
        parser.error("--images must be more than --batch-size (a fifth of them is held out)")
    return args


def run_values(args: argparse.Namespace, data_dir: Path, root: Path, watched: bool) -> dict:
    """The train config of one run: the tiny SDM of the tests at --channels, for --steps steps."""
    return {"data_dir": str(data_dir), "num_classes": 4, "root_log_dir": str(root), "image_size": args.image_size,
            "num_channels": args.channels, "num_res_blocks": 1, "channel_mult": "1,2,2",
            "attention_resolutions": str(args.image_size // 2), "num_head_channels": 32,
            "batch_size": args.batch_size, "lr": 3e-4, "max_epochs": 1_000_000, "max_steps": args.steps,
            "save_interval": args.steps, "log_interval": args.log_interval, "data_threads": 0,
            "tensorboard": watched, "preview_interval": args.preview_interval if watched else 0}


def timed_run(args: argparse.Namespace, data_dir: Path, root: Path, watched: bool) -> tuple[float, Path]:
    """Seconds of Trainer.run() (the loop, its logs, checkpoints and end files) and the run folder."""
    config, _ = config_from_dict("train", run_values(args, data_dir, root, watched), "watch_overhead")
    trainer = Trainer(config, "train", log=lambda *_: None)
    started = time.perf_counter()
    result = trainer.run()
    return time.perf_counter() - started, result.run_dir


def preview_seconds(run_dir: Path) -> list[float]:
    """The seconds of each preview of a run, as its TensorBoard events record them (preview/seconds)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("preview/seconds")] if "preview/seconds" in events.Tags()["scalars"] \
        else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (the import a watched run pays once)
    imported = time.perf_counter() - started
    interval = args.preview_interval
    if interval == "auto":
        interval = watch.auto_interval(args.steps, args.batch_size, 1.0)
    print(f"{args.steps} steps of batch {args.batch_size} at {args.image_size} px, num_channels {args.channels}, "
          f"{torch.get_num_threads()} torch threads; watched: TensorBoard every {args.log_interval} steps, "
          f"preview_interval {args.preview_interval} = {interval} steps ({args.steps // interval} preview(s) of "
          f"{watch.PREVIEW_IMAGES} masks, {watch.PREVIEW_SAMPLER} {watch.PREVIEW_STEPS} steps); importing "
          f"TensorBoard took {imported:.2f} s (once per process)\n")
    print("| pair | order | off s | watched s | overhead | previews | preview s | previews' share |")
    print("|---|---|---|---|---|---|---|---|")
    overheads, shares = [], []
    with tempfile.TemporaryDirectory() as folder:
        data_dir = make_demo_dataset(Path(folder) / "demo", num_train=args.images, num_test=2,
                                     image_size=args.image_size)
        for pair in range(args.pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            seconds, runs = {}, {}
            for watched in order:
                seconds[watched], runs[watched] = timed_run(args, data_dir, Path(folder) / "runs", watched)
            previews = preview_seconds(runs[True])
            overhead = seconds[True] / seconds[False] - 1
            share = sum(previews) / seconds[True]
            overheads.append(overhead)
            shares.append(share)
            print(f"| {pair + 1} | {'off first' if order[0] is False else 'watched first'} | {seconds[False]:.2f} | "
                  f"{seconds[True]:.2f} | {100 * overhead:+.1f}% | {len(previews)} | {sum(previews):.2f} | "
                  f"{100 * share:.1f}% |", flush=True)
    print(f"\nmedian overhead of the watched runs: {100 * statistics.median(overheads):+.1f}% over {args.pairs} "
          f"pairs (range {100 * min(overheads):+.1f}% to {100 * max(overheads):+.1f}%); previews' share of their "
          f"time: median {100 * statistics.median(shares):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

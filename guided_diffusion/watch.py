"""Watching a training run: TensorBoard scalars, preview grids of fixed held-out masks, and loss.png at the end.

What train.py's loop reports besides log.csv and epochs.csv, all into the run folder and by rank 0 alone (the
other ranks get a `Watch` that does nothing):

- `tensorboard/`: TensorBoard events (key `tensorboard`, when the package is installed): at every `log_interval`
  step the numbers of log.csv's row (loss, mse, vb, lr, images/s) plus the EMA rate and the gradient norm of that
  step; at every epoch's end the epoch's loss terms and the best loss so far; and each preview grid.
- `previews/step_NNNNNN.png` (key `preview_interval`): one row per mask, the mask in its palette colours | the
  sample the EMA weights make for it. The masks are the first PREVIEW_IMAGES held-out (val) masks, topped up with
  training masks when fewer are held out, each with its own fixed noise seed, so the rows of successive previews
  show one model learning. Ancestral sampling (SDM's sampler) over PREVIEW_STEPS steps of the model's process, guidance
  scale 1 unless the
  run trains the null label (drop_rate > 0, i.e. finetune), then sampling's default `s` (1.5). It runs under
  torch.no_grad and the run's autocast, with the model in eval mode (put back as it was) and the global RNG
  states restored, so training's draws, and thus its weights, are those of a run without previews.
- `loss.png` (`write_loss_plot`, at the end of every run): the logged step losses and the epoch losses from which
  best.pt is chosen, with the best epoch marked.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SampleConfig, TrainConfig
from .data import Pair, SegmentationDataset, one_hot
from .diffusion import GaussianDiffusion, space_timesteps
from .guidance import conditional_denoiser
from .run_folder import colorize, grid_array, to_uint8_image, write_png
from .samplers import PerImageNoise, image_seed, run_sampler

PREVIEW_IMAGES = 4
PREVIEW_SAMPLER = "ancestral"
PREVIEW_STEPS = 50
"""Not the fast recipe (DPM-Solver++(2M), 15-25 steps): on a model trained for minutes, where a preview matters most,
it draws noise where ancestral sampling already draws the masks (the demo's SDM after 360 steps: label alignment
0.42 with the fast recipe, 0.84 with ancestral 50 steps; docs/results.md#the-demo-in-minutes-2026-12-06)."""
PREVIEWS_PER_RUN = 10
"""`preview_interval` "auto": about this many previews over the run's planned steps ..."""
MAX_PREVIEW_SHARE = 0.02
"""... but never so often that the previews take more than this share of the training time (see auto_interval)."""
TENSORBOARD_MISSING = ("TensorBoard logging is off: the tensorboard package is not installed (pip install "
                       "tensorboard==2.21.0, or set \"tensorboard\": false to silence this line)")


def preview_guidance(config: TrainConfig) -> float:
    """The preview's guidance scale: 1 (none) unless the run trains the null label (drop_rate > 0, finetune's
    default), then sampling's default `s`."""
    return SampleConfig.s if config.drop_rate > 0 else 1.0


def preview_cost_in_steps(batch_size: int, guidance_scale: float) -> float:
    """About how many training steps one preview costs. A step is a forward and a backward (about 3 forwards) of
    `batch_size` images; a preview is PREVIEW_STEPS forwards of PREVIEW_IMAGES images (twice that with guidance).
    A forward of fewer images than the batch is counted as a whole batch's: on a GPU a small batch costs nearly as
    much as a full one."""
    passes = 2 if guidance_scale > 1 else 1
    return PREVIEW_STEPS * passes * max(1.0, PREVIEW_IMAGES / batch_size) / 3


def auto_interval(planned_steps: int, batch_size: int, guidance_scale: float) -> int:
    """`preview_interval` "auto": PREVIEWS_PER_RUN previews over `planned_steps`, but at least
    preview_cost_in_steps / MAX_PREVIEW_SHARE steps apart (834 steps at batch 4 or more without guidance, 1,667
    with), so that a short run spends at most MAX_PREVIEW_SHARE of its time on previews."""
    floor = math.ceil(preview_cost_in_steps(batch_size, guidance_scale) / MAX_PREVIEW_SHARE)
    return max(math.ceil(planned_steps / PREVIEWS_PER_RUN), floor)


@dataclass(frozen=True)
class Preview:
    """The fixed inputs of a run's previews: masks, their seeds, the sampled process and how to run it."""

    masks: torch.Tensor  # N x S x S int64 class ids
    seeds: list[int]
    diffusion: GaussianDiffusion  # the model's process respaced to PREVIEW_STEPS evenly spread steps
    guidance_scale: float
    num_classes: int
    ignore_index: int | None
    image_channels: int
    device: torch.device
    autocast: bool

    def sample(self, model: torch.nn.Module) -> torch.Tensor:
        """The N x C x S x S samples `model` makes for the masks (float32 in [-1, 1], on the CPU). The model is in
        eval mode meanwhile and then set back; the global RNG states are as before (training's draws come from
        them: dropout, and the CUDA generator)."""
        was_training = model.training
        cuda = [self.device] if self.device.type == "cuda" else []
        shape = (self.image_channels, *self.masks.shape[1:])
        model.eval()
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), \
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                labels = one_hot(self.masks, self.num_classes, self.ignore_index).to(self.device)
                noise = PerImageNoise(self.seeds, shape, self.device)
                denoise = conditional_denoiser(model, labels, self.guidance_scale)
                images = run_sampler(PREVIEW_SAMPLER, self.diffusion, denoise, noise(), noise)
        finally:
            model.train(was_training)
        return images.float().clamp(-1, 1).cpu()

    def grid(self, model: torch.nn.Module) -> np.ndarray:
        """The preview picture, uint8 H x W x 3: a row per mask, the coloured mask | its sample."""
        samples = self.sample(model)
        return grid_array([(colorize(mask.numpy(), self.num_classes, self.ignore_index), to_uint8_image(sample))
                           for mask, sample in zip(self.masks, samples)])


def make_preview(config: TrainConfig, diffusion: GaussianDiffusion, val_pairs: list[Pair], train_pairs: list[Pair],
                 device: torch.device, autocast: bool) -> Preview:
    """The run's preview inputs: the first PREVIEW_IMAGES held-out masks (topped up with training masks) at
    image_size, seeds from the run's seed, and `diffusion` (the training process) respaced to PREVIEW_STEPS steps."""
    pairs = (list(val_pairs) + list(train_pairs))[:PREVIEW_IMAGES]
    dataset = SegmentationDataset(pairs, config.image_size, config.dataset_mode, config.resize_mode, cache=False,
                                  image_channels=config.image_channels)
    masks = torch.stack([dataset[i]["mask"] for i in range(len(pairs))])
    steps = min(PREVIEW_STEPS, diffusion.num_timesteps)
    return Preview(masks, [image_seed(config.seed, i) for i in range(len(pairs))],
                   diffusion.respaced(space_timesteps(diffusion.num_timesteps, steps)), preview_guidance(config),
                   config.num_classes, config.ignore_index, config.image_channels, device, autocast)


class Watch:
    """Where the loop reports besides the CSV logs: a TensorBoard writer (or None) and previews every `interval`
    steps (0 = none). Rank 0's; `Watch()` is the one of the other ranks, which does nothing."""

    def __init__(self, run_dir: Path | None = None, writer: Any = None, preview: Preview | None = None,
                 interval: int = 0):
        self.run_dir, self.writer, self.preview, self.interval = run_dir, writer, preview, interval

    def scalars(self, step: int, values: dict[str, float | torch.Tensor], group: str = "train") -> None:
        """Log `values` as TensorBoard scalars `<group>/<name>` at `step` (no-op without a writer)."""
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{group}/{name}", float(value), step)

    def preview_due(self, step: int) -> bool:
        return self.preview is not None and self.interval > 0 and step % self.interval == 0

    def write_preview(self, step: int, model: torch.nn.Module) -> float:
        """previews/step_NNNNNN.png (and the TensorBoard image) of `model` after `step` steps; its seconds."""
        started = time.perf_counter()
        grid = self.preview.grid(model)
        write_png(self.run_dir / "previews" / f"step_{step:06d}.png", grid)  # whole or not at all
        seconds = time.perf_counter() - started
        if self.writer is not None:
            self.writer.add_image("preview", grid, step, dataformats="HWC")
            self.writer.add_scalar("preview/seconds", seconds, step)
        return seconds

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_tensorboard(log_dir: Path, log: Callable[[str], None]) -> Any:
    """A TensorBoard SummaryWriter into `log_dir`, or None (with one log line) when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # the optional tensorboard package
    except ImportError:
        log(TENSORBOARD_MISSING)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def open_watch(config: TrainConfig, run_dir: Path, planned_steps: int, is_main: bool, log: Callable[[str], None],
               preview_inputs: Callable[[], Preview]) -> Watch:
    """The run's Watch: rank 0's writes what `tensorboard` and `preview_interval` ask for (`preview_inputs` is
    called only when previews are on); the other ranks' does nothing."""
    if not is_main:
        return Watch()
    writer = open_tensorboard(run_dir / "tensorboard", log) if config.tensorboard else None
    interval = config.preview_interval
    guidance = preview_guidance(config)
    if interval == "auto":
        interval = auto_interval(planned_steps, config.batch_size, guidance)
    if writer is not None:
        log(f"TensorBoard events in {run_dir / 'tensorboard'} (tensorboard --logdir {config.root_log_dir})")
    previews = 0 < interval <= planned_steps
    if previews:
        log(f"previews every {interval} steps{' (auto)' if config.preview_interval == 'auto' else ''}: "
            f"{PREVIEW_IMAGES} fixed masks, {PREVIEW_SAMPLER} {PREVIEW_STEPS} steps, guidance {guidance:g}, into "
            f"{run_dir / 'previews'}")
    elif interval:
        log(f"no previews in this run: preview_interval {config.preview_interval} is {interval} steps, more than "
            f"its {planned_steps} planned steps; set a smaller preview_interval to see some")
    return Watch(run_dir, writer, preview_inputs() if previews else None, interval if previews else 0)


# ----------------------------------------------------------------------------------------------------------------
# loss.png


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _finite_points(rows: list[dict[str, str]], x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) of the rows whose y is a finite number (a diverged run's NaN rows are left out)."""
    points = [(float(row[x]), float(row[y])) for row in rows if row.get(y) and math.isfinite(float(row[y]))]
    return [p[0] for p in points], [p[1] for p in points]


def loss_figure(step_rows: list[dict[str, str]], epoch_rows: list[dict[str, str]], best_epoch: int, title: str):
    """The loss curve: log.csv's step losses, epochs.csv's epoch losses at their last step, and the best epoch
    (the one best.pt holds) marked; a log-scale loss axis. A matplotlib Figure (no pyplot: no global state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    ax = figure.subplots()
    steps, losses = _finite_points(step_rows, "step", "loss")
    ax.plot(steps, losses, color="tab:blue", linewidth=0.8, alpha=0.6, label="step loss (log.csv)")
    ends, epoch_losses = _finite_points(epoch_rows, "step", "loss")
    ax.plot(ends, epoch_losses, "o-", color="tab:orange", markersize=4, label="epoch loss (epochs.csv)")
    checked, fixed_losses = _finite_points(epoch_rows, "step", "fixed_loss")
    if fixed_losses:
        ax.plot(checked, fixed_losses, "s-", color="tab:green", markersize=3,
                label="EMA loss on the fixed batch (picks best.pt)")
    best = [row for row in epoch_rows if row.get("epoch") == str(best_epoch)]
    if best:
        by = "fixed_loss" if best[0].get("fixed_loss") else "loss"
        ax.plot([float(best[0]["step"])], [float(best[0][by])], "*", color="tab:red", markersize=14,
                label=f"best.pt: epoch {best_epoch}")
    if losses or epoch_losses:
        if min(losses + epoch_losses + fixed_losses) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return figure


def write_loss_plot(run_dir: Path, best_epoch: int) -> Path:
    """`run_dir`/loss.png from its log.csv and epochs.csv (this run's rows: a resumed run's start at its step)."""
    figure = loss_figure(_read_rows(run_dir / "log.csv"), _read_rows(run_dir / "epochs.csv"), best_epoch,
                         f"{run_dir.name}: loss")
    path = run_dir / "loss.png"
    figure.savefig(path)
    return path

"""The training loop behind `main.py train` and `main.py finetune`.

One loop serves training from scratch, exact resume and finetuning; what differs is where it starts
(`resume_checkpoint`): a checkpoint of the same action resumes exactly (weights, EMA, optimizer, step, epoch,
position in the epoch, RNG states); a checkpoint of another action, or a plain SDM/ISDM state dict, only
initialises the weights.

Every random draw of a step (batch order, flips, timesteps, noise, null labels) comes from CPU generators whose
state is in the checkpoint, so N steps + resume + M steps gives the weights of N + M steps. The epoch loss is
the mean of the per-sample losses already computed for the epoch's batches. The best epoch is the one whose EMA
weights have the lowest loss on one fixed batch (`best_by`, see best_epoch.py; ISDM's rule, the lowest epoch loss,
is `best_by: "epoch_loss"`); its checkpoint is kept as `checkpoints/best.pt`, the full state every
`save_interval` steps as `latest.pt`.

With N processes (see distributed.py) the model is wrapped in DistributedDataParallel and `batch_size` is the
batch of one process: a step takes a global batch of batch_size x N items of the epoch's order, and each rank
loads and trains on its own contiguous slice of it. Every rank draws the step's random quantities (flips,
timesteps, noise, null labels) for the whole global batch from the same generator and keeps its slice, so N
processes compute what one process with the global batch computes, up to float rounding. Rank 0 alone writes
logs and checkpoints; the epoch loss is the all-reduced sum of the losses every rank already computed.

SIGTERM (Slurm's preemption or requeue) and SIGUSR1 (`sbatch --signal=USR1@...` before the time limit) end the
loop after the current step with `latest.pt` saved; `main.py` then exits with status 75 and the sbatch
templates requeue the job, which resumes from that checkpoint (`auto_resume`).

Besides log.csv and epochs.csv, rank 0 writes TensorBoard events (scalars, preview grids of fixed held-out masks
every `preview_interval` steps) and, at the end, loss.png: see watch.py.

A loss that stops being finite (NaN or inf, usually an lr far too high) ends the run with the one-line error
`loss is NaN at step N (lr L); best.pt still holds epoch E` (exit status 2) and `diverged` in summary.json.
The check costs no extra wait for the GPU per step: the first non-finite step is remembered on the device and
read where the loop waits anyway (a logged step, an epoch's end, a checkpoint). Every checkpoint write checks the
weights first, so best.pt and latest.pt never hold non-finite weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .best_epoch import FixedBatch, check_interval, fixed_batch_loss, make_fixed_batch
from .config import TrainConfig, config_to_dict
from .data import SegmentationDataset, index_dataset, one_hot, read_class_names, split_train_val
from .diffusion import GaussianDiffusion
from .errors import ConfigError, UserError
from .model_setup import bf16_autocast, build_model, cpu_bf16_support, resolve_image_channels, select_device
from .run_folder import CsvLog, hold_run, new_run_dir, write_json
from .watch import Preview, Watch, make_preview, open_watch, write_loss_plot

STEP_FIELDS = ["step", "epoch", "loss", "mse", "vb", "lr", "images_per_s"]
EPOCH_FIELDS = ["epoch", "step", "loss", "mse", "vb", "fixed_loss", "best_loss", "is_best", "images_per_s",
                "seconds"]


def crop_windows(batch: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """The size x size window at (top[i], left[i]) of each item i of an N x ... x H x W batch."""
    return torch.stack([item[..., y:y + size, x:x + size] for item, y, x in zip(batch, top.tolist(), left.tolist())])


def build_diffusion(config, prediction: str = "eps") -> GaussianDiffusion:
    """The model's training process (diffusion_steps, usually 1000); `prediction`: what the model predicts (the
    SDM eps; the mask generator's key `prediction` may choose v)."""
    return GaussianDiffusion.create(config.diffusion_steps, config.noise_schedule, learn_sigma=config.learn_sigma,
                                    rescale_timesteps=config.rescale_timesteps, prediction=prediction)


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of an epoch; a pure function of (seed, epoch) so a resume can recreate it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


@dataclass
class TrainState:
    """Everything that changes during training, saved in `latest.pt`."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already done
    epoch_sums: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, mse, vb sums
    epoch_count: int = 0
    best_loss: float = math.inf  # of best_epoch, by `best_by`: its fixed-batch loss, or its epoch loss
    best_epoch: int = -1
    last_check_step: int = -1  # the step of the last fixed-batch check (-1: none yet)
    best_by: str = "epoch_loss"  # the rule best_loss was measured by (a checkpoint older than the key: ISDM's)
    epochs_without_improvement: int = 0
    steps_without_improvement: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    latest_checkpoint: Path
    state: TrainState
    stop_reason: str
    stop_signal: str | None = None  # "SIGTERM"/"SIGUSR1" when a signal ended the run (latest.pt was saved)


class _NoLog:
    """Stands in for the CSV logs on ranks other than 0, which write nothing."""

    def write(self, _row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite (usually lr far too high); the message names the step, its lr
    and what best.pt still holds."""


@dataclass(frozen=True)
class EpochPlan:
    """How the training items are cut into steps."""

    num_items: int
    global_batch: int  # batch_size x processes
    batches_per_epoch: int
    total_steps: int  # max_epochs worth of steps, or max_steps when fewer: the bar's total


@dataclass(frozen=True)
class Stop:
    """Why the loop ended: summary.json's stop_reason, the stop signal (the job is requeued) or the divergence."""

    reason: str = "max_epochs reached"
    signal: str | None = None
    diverged: TrainingDiverged | None = None


@dataclass
class _Progress:
    """What the loop reports to: the CSV logs, the bar, TensorBoard and previews (watch.py), and the images since
    the last logged step (for img/s)."""

    steps: CsvLog | _NoLog
    epochs: CsvLog | _NoLog
    bar: tqdm
    watch: Watch = dataclasses.field(default_factory=Watch)
    window_images: int = 0
    window_start: float = dataclasses.field(default_factory=time.perf_counter)

    def close(self) -> None:
        self.bar.close()
        self.steps.close()
        self.epochs.close()
        self.watch.close()


class FirstNonFinite:
    """The first step whose loss was not finite, kept on the device: noting a step never waits for the GPU;
    `read()` does, so the loop calls it only where it waits anyway."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), math.inf, dtype=torch.float64, device=device)  # inf: every loss was finite
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def note(self, loss_sum: torch.Tensor, step: int) -> None:
        """Remember `step` if its summed loss is NaN or inf and no earlier step's was."""
        first = torch.isinf(self.step) & ~torch.isfinite(loss_sum)
        self.step = torch.where(first, float(step), self.step)
        self.loss = torch.where(first, loss_sum, self.loss)

    def read(self) -> tuple[int | None, str]:
        """The earliest non-finite step over all ranks (None: none) and this rank's loss there ("NaN" or "inf");
        a collective with several processes."""
        step = self.step.clone()
        if distributed.current_world().size > 1:
            torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
        step, loss = step.item(), self.loss.item()
        return (None if math.isinf(step) else int(step)), ("inf" if math.isinf(loss) else "NaN")


def ema_warmup_rate(step: int) -> float:
    """The EMA rate cap of `ema_warmup` after `step` optimiser steps: (1+step)/(10+step), an average over about
    the last step/10 steps, so a short run's EMA does not hold the random initialisation."""
    return (1 + step) / (10 + step)


def ema_warmup_reaches(rate: float) -> int:
    """The first step at which `ema_warmup`'s cap reaches `rate`: before it, the EMA rate is the cap, whatever
    `ema_rate` says (0.999 from step 8,990, 0.9999 from step 89,990)."""
    step = max(0, math.ceil(9 / (1 - rate) - 10))  # the exact answer, give or take a step of rounding
    while step > 0 and ema_warmup_rate(step - 1) >= rate:
        step -= 1
    while ema_warmup_rate(step) < rate:
        step += 1
    return step


def finite_weights(*modules: torch.nn.Module) -> bool:
    """Whether every parameter of `modules` is finite (one wait for the device, however many tensors)."""
    return bool(torch.stack([torch.isfinite(p).all() for m in modules for p in m.parameters()]).all())


class Trainer:
    """Holds the objects built once for a run; `run()` executes the loop."""

    def __init__(self, config: TrainConfig, action: str, log=print):
        """Validate the data and build everything; only then make the run's fresh folder under root_log_dir
        (rank 0 makes it; the other ranks learn its path and write nothing)."""
        self.world = distributed.current_world()
        self.config, self.action = config, action
        self.log = log if self.world.is_main else (lambda *_: None)
        self.device = select_device(config.device)
        torch.manual_seed(config.seed)
        index = index_dataset(config.data_dir, config.dataset_mode, config.num_classes, require_test=False,
                              ignore_value=config.ignore_index)
        self.class_names = read_class_names(config.data_dir, config.num_classes)
        config = self.config = resolve_image_channels(config, index.train, self.log)
        self.train_pairs, self.val_pairs = split_train_val(index.train, config.val_fraction, config.seed)
        self.dataset = self.make_dataset(config)
        self.diffusion = self.make_diffusion(config)
        self.model = build_model(config).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.state = TrainState(best_by=config.best_by)
        # This rank's sums of loss/mse/vb over the epoch so far (rank 0's also hold what a resume carried over).
        self.running = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.first_non_finite = FirstNonFinite(self.device)
        self.grad_norm = torch.zeros((), device=self.device)  # the gradient norm of the last logged step
        self.fixed_batch: FixedBatch | None = None  # made at the first check (best_by fixed_batch)
        self.ddp: DistributedDataParallel | None = None
        if self.world.size > 1:  # broadcasts rank 0's weights; averages gradients in backward
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        network = self.ddp if self.ddp is not None else self.model
        self.forward = torch.compile(network) if config.compile else network
        self.autocast = bf16_autocast(config.precision, self.device)
        if config.precision != "fp32":
            cpu_note = f" (CPU bf16: {cpu_bf16_support()})" if self.device.type == "cpu" else ""
            self.log(f"precision {config.precision}: {'bf16 autocast' if self.autocast else 'fp32'} on "
                     f"{self.device}{cpu_note}")
        self.run_dir = distributed.made_by_main(lambda: new_run_dir(config.root_log_dir, action))
        self.checkpoint_dir = self.run_dir / "checkpoints"
        # rank 0 holds the run folder until run() ends, so that auto_resume elsewhere leaves this run alone
        self.run_lock = hold_run(self.run_dir) if self.world.is_main else None
        if self.world.is_main:
            self.checkpoint_dir.mkdir()
            write_json(self.run_dir / "config.json", config_to_dict(config))
        self.log(f"run folder: {self.run_dir}")

    def make_dataset(self, config: TrainConfig) -> torch.utils.data.Dataset:
        """The items trained on, made from `self.train_pairs`: {"image": C×S×S in [-1, 1], "mask": S×S class ids,
        "index"}. The mask generator's trainer (masks/train.py) trains on encoded masks instead."""
        return SegmentationDataset(self.train_pairs, config.image_size, config.dataset_mode, config.resize_mode,
                                   image_channels=config.image_channels)

    def make_diffusion(self, config: TrainConfig) -> GaussianDiffusion:
        """The training process; the mask generator's may predict v instead of eps (masks/train.py)."""
        return build_diffusion(config)

    def pixel_weights(self, images: torch.Tensor) -> torch.Tensor | None:
        """Weights of each pixel's squared error in the loss, for a batch of training images; None = all equal
        (the SDM). The mask generator's trainer weights its rare classes' pixels up (masks/train.py)."""
        return None

    # --- starting point ---------------------------------------------------------------------------------
    def check_start(self, payload: dict[str, Any], path: Path) -> None:
        """A hook: raise one error line when the checkpoint at `path` (its loaded `payload`) cannot start this run
        (the mask generator's refuses image models and the other `prediction`); the SDM accepts any."""

    def start_from(self, path: Path) -> str:
        """Resume exactly from a checkpoint of this action, else initialise the weights from it."""
        payload = ckpt.load_checkpoint(path)
        self.check_start(payload, path)
        same_action = payload.get("action") == self.action and "optimizer" in payload
        state_dict = ckpt.extract_state_dict(payload, prefer_ema=False)
        ema_dict = ckpt.extract_state_dict(payload, prefer_ema=True)
        channels = ckpt.image_channels_of(state_dict)
        if channels is not None and channels != self.config.image_channels:
            raise ConfigError(f"checkpoint {path} is a model of {channels}-channel images but this run's "
                              f"image_channels is {self.config.image_channels}; set image_channels to {channels} "
                              f"to start from it")
        for net, weights in ((self.model, state_dict), (self.ema, ema_dict)):
            ckpt.load_weights(net, weights, path, "the config's model")
        if not same_action:
            return f"initialised weights from {path}"
        self.optimizer.load_state_dict(payload["optimizer"])
        earlier_best = Path(path).parent / "best.pt"
        if earlier_best.is_file() and self.world.is_main:  # the best epoch so far may be in the earlier run
            ckpt.save_checkpoint(self.checkpoint_dir / "best.pt", ckpt.load_checkpoint(earlier_best))
        self.state = TrainState(**payload["train_state"])
        if self.state.best_by != self.config.best_by:  # two rules' losses cannot be compared: start the race anew
            self.log(f"note: {path} chose its best epoch by {self.state.best_by}, this run by {self.config.best_by}; "
                     f"the next checked epoch becomes best.pt")
            self.state.best_loss, self.state.best_by = math.inf, self.config.best_by
        self.generator.set_state(payload["generator"])
        ckpt.set_rng_state(payload["rng"])
        return f"resuming exactly from {path} (step {self.state.step}, epoch {self.state.epoch})"

    # --- checkpoints --------------------------------------------------------------------------------------
    def _payload(self, full: bool) -> dict[str, Any]:
        payload = {"format": "sdm-checkpoint-v1", "action": self.action, "config": config_to_dict(self.config),
                   "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                   "train_state": dataclasses.asdict(self.state)}
        if full:
            payload.update(optimizer=self.optimizer.state_dict(), generator=self.generator.get_state(),
                           rng=ckpt.rng_state())
        return payload

    def save_latest(self) -> None:
        """Rank 0 saves the full state; a collective with several processes (all ranks call it together).
        Raises TrainingDiverged, saving nothing, when a loss so far or a weight is not finite."""
        self.state.epoch_sums = distributed.all_reduce_sum(self.running).tolist()
        self._check_finite()
        if self.world.is_main:
            ckpt.save_checkpoint(self.checkpoint_dir / "latest.pt", self._payload(full=True))

    # --- divergence -----------------------------------------------------------------------------------------
    def _check_finite(self) -> None:
        """Raise TrainingDiverged if a loss so far or a weight (model or EMA) is not finite; a collective."""
        found = self.first_non_finite.read()
        if found[0] is not None:
            self._raise_diverged(found)
        if distributed.any_rank(not finite_weights(self.model, self.ema), self.device):
            raise TrainingDiverged(self._diverged_text(f"the weights are not finite after step {self.state.step}",
                                                       self.state.step))

    def _raise_diverged(self, found: tuple[int | None, str] | None = None) -> None:
        """Raise TrainingDiverged for the first step whose loss was not finite (`found`, else read: a collective)."""
        step, kind = found or self.first_non_finite.read()
        step = self.state.step if step is None else step
        raise TrainingDiverged(self._diverged_text(f"loss is {kind} at step {step}", step))

    def _diverged_text(self, what: str, step: int) -> str:
        """`what` with the step's lr and what best.pt holds: the error line and summary.json's stop_reason."""
        if not (self.checkpoint_dir / "best.pt").exists():
            best = "no best.pt was written"
        elif self.state.best_epoch >= 0:
            best = f"best.pt still holds epoch {self.state.best_epoch}"
        else:
            best = "best.pt still holds the last weights of the run resumed from"
        return f"{what} (lr {self._lr(step - 1):g}); {best}"

    # --- one step -----------------------------------------------------------------------------------------
    def _draws(self, batch_size: int) -> dict[str, torch.Tensor]:
        g, shape = self.generator, (batch_size, self.config.image_channels, self.config.image_size,
                                    self.config.image_size)
        cfg = self.config
        if cfg.crop_size:  # the noise (and the model's input) is the size of the crop
            shape = shape[:2] + (cfg.crop_size, cfg.crop_size)
        draws = {
            "flip": torch.rand(batch_size, generator=g) < (0.5 if self.config.random_flip else 0.0),
            "t": torch.randint(0, self.diffusion.num_timesteps, (batch_size,), generator=g),
            "noise": torch.randn(shape, generator=g),
            "keep_label": torch.rand(batch_size, generator=g) >= self.config.drop_rate,
        }
        # The levers' draws come last and only when on, so a run without them draws what it always drew.
        if cfg.crop_size:
            room = cfg.image_size - cfg.crop_size + 1
            draws["top"] = torch.randint(0, room, (batch_size,), generator=g)
            draws["left"] = torch.randint(0, room, (batch_size,), generator=g)
        if cfg.offset_noise:  # a constant per image and channel: lets the model learn mean brightness and colour
            draws["noise"] = draws["noise"] + cfg.offset_noise * torch.randn(shape[:2] + (1, 1), generator=g)
        return draws

    def _lr(self, step: int | None = None) -> float:
        """The lr of the step taken after `step` steps (default: the next one): linear warm-up from
        lr / lr_warmup_steps to lr over the first lr_warmup_steps steps, times a linear decay to 0 over
        lr_anneal_steps steps."""
        step = self.state.step if step is None else step
        lr = self.config.lr
        if self.config.lr_warmup_steps:
            lr *= min(1.0, (step + 1) / self.config.lr_warmup_steps)
        if self.config.lr_anneal_steps:
            lr *= max(0.0, 1 - step / self.config.lr_anneal_steps)
        return lr

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, rows: slice | None = None,
                   batch_count: int | None = None, padding: bool = False) -> torch.Tensor:
        """One optimiser step; returns the per-sample [loss, mse, vb] of `images` (detached).

        `images`/`masks` are rows `rows` of a global batch of `batch_count` items (one process: all of them).
        The draws are made for the whole global batch and sliced, so every rank draws what one process would.
        A rank's loss is its sum divided by batch_count / world size: DDP's average over ranks then is the
        gradient of the global batch's mean loss, even when a last partial batch splits unevenly. A `padding`
        rank (a last batch with fewer items than ranks) trains on one borrowed item with weight 0, because
        every rank must take part in DDP's gradient all-reduce."""
        batch_count = images.shape[0] if batch_count is None else batch_count
        rows = slice(0, batch_count) if rows is None else rows
        draws = {name: value[rows] for name, value in self._draws(batch_count).items()}
        flip = draws["flip"]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
        if self.config.crop_size:  # image and mask share the window
            images = crop_windows(images, draws["top"], draws["left"], self.config.crop_size)
            masks = crop_windows(masks, draws["top"], draws["left"], self.config.crop_size)
        labels = one_hot(masks, self.config.num_classes, self.config.ignore_index)
        labels = labels * draws["keep_label"][:, None, None, None].float()
        images, labels = images.to(self.device), labels.to(self.device)
        t, noise = draws["t"].to(self.device), draws["noise"].to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        chunk = self.config.microbatch if self.config.microbatch > 0 else images.shape[0]
        starts = range(0, images.shape[0], chunk)
        divisor = batch_count / self.world.size
        per_sample = []
        for start in starts:
            sl = slice(start, start + chunk)
            accumulate = self.ddp is not None and start != starts[-1]  # all-reduce once, after the last chunk
            with self.ddp.no_sync() if accumulate else nullcontext():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    terms = self.diffusion.training_losses(lambda x, ts: self.forward(x, ts, labels[sl]),
                                                           images[sl], t[sl], noise[sl], self.config.min_snr_gamma,
                                                           self.pixel_weights(images[sl]))
                loss = terms["loss"].sum() / divisor
                (loss * 0.0 if padding else loss).backward()
            per_sample.append(torch.stack([terms["loss"], terms["mse"], terms["vb"]], dim=1).detach().float())
        if (self.state.step + 1) % self.config.log_interval == 0:  # a logged step: its norm (no wait for the GPU)
            self.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters()
                                                             if p.grad is not None])
        self.optimizer.step()
        self._update_ema()
        return torch.cat(per_sample)

    def _ema_rate(self, step: int) -> float:
        """The EMA rate of the update after `step` optimiser steps."""
        if self.config.ema_warmup:  # early on, average over ~step/10 recent steps, not over the random init
            return min(self.config.ema_rate, ema_warmup_rate(step))
        return self.config.ema_rate

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_params = list(self.ema.parameters())
        params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - self._ema_rate(self.state.step))

    # --- the loop -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until max_epochs, max_steps, patience or a stop signal; save latest.pt, best.pt, summary.json.
        Raises TrainingDiverged, after writing summary.json, when the loss or the weights stop being finite."""
        plan = self._plan()
        self._log_start(plan)
        # Stop signals are recorded, not fatal, until the run has written its files and every rank is done.
        with distributed.StopSignals() as signals:
            try:
                stop = self._train_and_save(plan, signals)
                if self.world.is_main:
                    self._write_end_files(stop, plan)
            finally:
                if self.run_lock is not None:
                    self.run_lock.release()
            distributed.barrier()  # no rank exits (and ends an srun step) before rank 0 wrote its files
        if stop.diverged is not None:
            raise stop.diverged
        state = self.state
        by = "fixed-batch loss" if self.config.best_by == "fixed_batch" else "epoch loss"
        best_text = (f"best epoch {state.best_epoch} ({by} {state.best_loss:.5f})" if state.best_epoch >= 0 else
                     "no epoch completed, so best.pt holds the last weights")
        self.log(f"{stop.reason}; {best_text}; checkpoints in {self.checkpoint_dir}")
        return TrainResult(self.run_dir, self.checkpoint_dir / "best.pt", self.checkpoint_dir / "latest.pt", state,
                           stop.reason, stop.signal)

    def _plan(self) -> EpochPlan:
        num_items, global_batch = len(self.dataset), self.config.batch_size * self.world.size
        batches_per_epoch = math.ceil(num_items / global_batch)
        total = self.config.max_epochs * batches_per_epoch
        if self.config.max_steps:
            total = min(total, self.config.max_steps)
        return EpochPlan(num_items, global_batch, batches_per_epoch, total)

    def _log_start(self, plan: EpochPlan) -> None:
        cfg, world, held_out = self.config, self.world, len(self.val_pairs)
        if world.size == 1:
            self.log(f"training on {plan.num_items} images ({held_out} held out for validation), "
                     f"{plan.batches_per_epoch} batches of {cfg.batch_size} per epoch, device {self.device}")
        else:
            self.log(f"training on {plan.num_items} images ({held_out} held out for validation) with "
                     f"{world.size} processes: global batch {plan.global_batch} = batch_size {cfg.batch_size} per "
                     f"process x {world.size} processes, {plan.batches_per_epoch} batches per epoch, rank 0 on "
                     f"{self.device}")
        self.log("classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(self.class_names)))
        reaches = ema_warmup_reaches(cfg.ema_rate)
        if cfg.ema_warmup and 0 < plan.total_steps <= reaches:
            self.log(f"note: ema_rate {cfg.ema_rate} is never used in this run: with ema_warmup the EMA rate is "
                     f"min(ema_rate, (1+step)/(10+step)), which reaches {cfg.ema_rate} only at step {reaches:,}; "
                     f"this run ends by step {plan.total_steps:,} (EMA rate "
                     f"{ema_warmup_rate(plan.total_steps - 1):.4f} there), so any ema_rate above that gives the "
                     f"same weights")

    def _open_progress(self, plan: EpochPlan) -> _Progress:
        """The CSV logs, TensorBoard and previews (rank 0 alone writes them) and the bar of the run's steps."""
        main = self.world.is_main
        steps = CsvLog(self.run_dir / "log.csv", STEP_FIELDS) if main else _NoLog()
        epochs = CsvLog(self.run_dir / "epochs.csv", EPOCH_FIELDS) if main else _NoLog()
        watch = open_watch(self.config, self.run_dir, plan.total_steps, main, self.log, self.preview_inputs)
        bar = tqdm(total=plan.total_steps, initial=min(self.state.step, plan.total_steps), desc=self.action,
                   unit="step", dynamic_ncols=True, disable=self.world.bar_disabled)
        return _Progress(steps, epochs, bar, watch)

    def preview_inputs(self) -> Preview:
        """The fixed masks, seeds and sampling process of this run's previews (watch.py)."""
        return make_preview(self.config, self.diffusion, self.val_pairs, self.train_pairs, self.device,
                            self.autocast)

    def _train_and_save(self, plan: EpochPlan, signals: distributed.StopSignals) -> Stop:
        """The epochs, then latest.pt; a divergence ends them as a Stop (no checkpoint is written with it)."""
        progress = self._open_progress(plan)
        try:
            self._load_ahead(plan)
            stop = self._train_epochs(plan, progress, signals)
            self.save_latest()
            return stop
        except TrainingDiverged as diverged:
            return Stop(f"diverged: {diverged}", diverged=diverged)
        except KeyboardInterrupt:
            if self.world.size == 1:  # with several ranks the others may not be here: no collective save
                self.save_latest()
                self.log(f"interrupted: saved {self.checkpoint_dir / 'latest.pt'}")
            raise
        finally:
            progress.close()
            if isinstance(self.dataset, SegmentationDataset):
                self.dataset.stop_loading()

    def _load_ahead(self, plan: EpochPlan) -> None:
        """Queue the loads of this rank's pairs for the rest of the current epoch (`data_threads` background
        threads decode and resize them into the dataset's cache while the steps run; later epochs read the
        cache)."""
        if not isinstance(self.dataset, SegmentationDataset) or self.config.data_threads < 1:
            return
        order = epoch_order(plan.num_items, self.config.seed, self.state.epoch)
        wanted = [i for b in range(self.state.batch_in_epoch, plan.batches_per_epoch)
                  for i in self._rank_items(order[b * plan.global_batch:(b + 1) * plan.global_batch])[0]]
        self.dataset.load_ahead(wanted, self.config.data_threads)

    def _train_epochs(self, plan: EpochPlan, progress: _Progress, signals: distributed.StopSignals) -> Stop:
        epoch_start = time.perf_counter()
        while self.state.epoch < self.config.max_epochs:
            stop = self._train_epoch(plan, progress, signals)
            if self.state.batch_in_epoch < plan.batches_per_epoch:
                return stop  # stopped inside the epoch (max_steps, step patience or a signal)
            self._end_epoch(progress, time.perf_counter() - epoch_start)
            epoch_start = time.perf_counter()
            signal = stop.signal if stop is not None else None
            patience = self._patience_stop("epochs") or self._patience_stop("steps")
            if patience is not None:
                return dataclasses.replace(patience, signal=signal)
            if signal is not None:
                return stop
        return Stop()

    def _train_epoch(self, plan: EpochPlan, progress: _Progress, signals: distributed.StopSignals) -> Stop | None:
        """The epoch's remaining steps; a Stop when max_steps, step patience or a stop signal ends them."""
        cfg, state = self.config, self.state
        order = epoch_order(plan.num_items, cfg.seed, state.epoch)
        carried = state.epoch_sums if self.world.is_main else [0.0, 0.0, 0.0]  # counted once, on rank 0
        self.running = torch.tensor(carried, dtype=torch.float64, device=self.device)
        for b in range(state.batch_in_epoch, plan.batches_per_epoch):
            if cfg.max_steps and state.step >= cfg.max_steps:
                return Stop("max_steps reached")
            self._train_batch(order[b * plan.global_batch:(b + 1) * plan.global_batch], b, progress)
            stop = self._signal_stop(signals) or self._patience_stop("steps")
            if stop is not None:
                return stop
        return None

    def _train_batch(self, indices: list[int], b: int, progress: _Progress) -> None:
        """One step on the epoch's batch b (the global batch `indices`), then its log row and latest.pt when due."""
        cfg, state = self.config, self.state
        per_sample = self._step_on(indices)
        step_sums = per_sample.sum(0).double()
        self.running += step_sums
        state.step += 1
        state.batch_in_epoch = b + 1
        state.epoch_count += len(indices)
        self.first_non_finite.note(step_sums[0], state.step)
        progress.window_images += len(indices)
        progress.bar.update(1)
        if state.step % cfg.log_interval == 0:
            self._log_step(per_sample, progress)
        if progress.watch.preview_due(state.step):  # img/s counts the training time alone
            progress.window_start += progress.watch.write_preview(state.step, self.ema)
        if cfg.patience_unit == "steps":
            state.steps_without_improvement += 1
        if state.step % cfg.save_interval == 0:
            self.save_latest()

    def _log_step(self, per_sample: torch.Tensor, progress: _Progress) -> None:
        """log.csv's row of the step just taken; its loss, fetched for the row, is where a NaN is first seen."""
        state = self.state
        means = self._mean_over_ranks(per_sample)
        elapsed = time.perf_counter() - progress.window_start
        speed = progress.window_images / elapsed if elapsed > 0 else 0.0
        row = {"loss": means[0], "mse": means[1], "vb": means[2], "lr": self._lr(state.step - 1),
               "images_per_s": round(speed, 3)}
        progress.steps.write({"step": state.step, "epoch": state.epoch, **row})
        progress.watch.scalars(state.step, {**row, "ema_rate": self._ema_rate(state.step - 1),
                                            "grad_norm": self.grad_norm})
        progress.bar.set_postfix(loss=f"{means[0]:.4f}", img_s=f"{speed:.1f}")
        progress.window_images, progress.window_start = 0, time.perf_counter()
        if not all(math.isfinite(mean) for mean in means):
            self._raise_diverged()

    def _signal_stop(self, signals: distributed.StopSignals) -> Stop | None:
        if not distributed.any_rank(signals.received is not None, self.device):
            return None
        signal = signals.received or "a stop signal on another rank"
        return Stop(f"stopped by {signal} after step {self.state.step}: latest.pt saved; rerun with auto_resume "
                    "(or resume_checkpoint) to continue", signal)

    def _patience_stop(self, unit: str) -> Stop | None:
        """A Stop when key `patience` counts `unit` ("steps" or "epochs") and that many passed without a new best."""
        cfg, state = self.config, self.state
        waited = state.steps_without_improvement if unit == "steps" else state.epochs_without_improvement
        if cfg.patience and cfg.patience_unit == unit and waited >= cfg.patience:
            return Stop(f"no improvement for {cfg.patience} {unit}")
        return None

    def _write_end_files(self, stop: Stop, plan: EpochPlan) -> None:
        """Rank 0: best.pt when no epoch ended (the latest weights are all there is; never after a divergence),
        summary.json and loss.png."""
        state, best = self.state, self.checkpoint_dir / "best.pt"
        if not best.exists() and stop.diverged is None:  # save_latest checked these weights
            ckpt.save_checkpoint(best, self._payload(full=False))
        summary = {"stop_reason": stop.reason, "diverged": stop.diverged is not None, "steps": state.step,
                   "epochs_completed": state.epoch, "best_epoch": state.best_epoch,
                   "best_loss": state.best_loss if math.isfinite(state.best_loss) else None,
                   "best_by": self.config.best_by,
                   "processes": self.world.size, "global_batch": plan.global_batch}
        write_json(self.run_dir / "summary.json", summary)
        write_loss_plot(self.run_dir, state.best_epoch)

    def _step_on(self, indices: list[int]) -> torch.Tensor:
        """Load this rank's slice of the global batch `indices` and train one step; its per-sample terms."""
        mine, rows, padding = self._rank_items(indices)
        items = [self.dataset[i] for i in mine]
        images = torch.stack([it["image"] for it in items])
        masks = torch.stack([it["mask"] for it in items])
        per_sample = self.train_step(images, masks, rows, len(indices), padding)
        return per_sample[:0] if padding else per_sample

    def _rank_items(self, indices: list[int]) -> tuple[list[int], slice, bool]:
        """The items of the global batch `indices` this rank loads, their rows in it, and whether they are
        padding (a batch smaller than the world: the rank computes on the batch's first item and counts nothing)."""
        start, stop = distributed.shard_bounds(len(indices), self.world)
        padding = start == stop
        rows = slice(0, 1) if padding else slice(start, stop)
        return list(indices[rows]), rows, padding

    def _mean_over_ranks(self, per_sample: torch.Tensor) -> list[float]:
        """The step's mean [loss, mse, vb] over the global batch (all-reduced from every rank's terms)."""
        if self.world.size == 1:
            return per_sample.mean(0).tolist()
        count = torch.tensor([per_sample.shape[0]], dtype=torch.float64, device=per_sample.device)
        totals = distributed.all_reduce_sum(torch.cat([per_sample.sum(0).double(), count]))
        return (totals[:3] / totals[3]).tolist()

    def network_of(self, module: torch.nn.Module):
        """`module` called as the training step calls the network: (x_t, timesteps, one-hot labels). The mask
        generator's trainer wraps it in its presence condition (masks/train.py)."""
        return module

    def _fixed_loss(self) -> float | None:
        """The EMA weights' loss on the run's fixed batch when a check is due at this epoch's end (best_by
        fixed_batch; the first epoch, then every check_interval steps), else None. A collective."""
        cfg, state = self.config, self.state
        if cfg.best_by != "fixed_batch":
            return None
        if state.last_check_step >= 0 and state.step - state.last_check_step < check_interval(
                cfg.batch_size * self.world.size):
            return None
        if self.fixed_batch is None:
            self.fixed_batch = make_fixed_batch(self.dataset.__getitem__, len(self.dataset),
                                                self.diffusion.num_timesteps, cfg.num_classes, cfg.ignore_index,
                                                cfg.seed, cfg.crop_size, cfg.drop_rate, cfg.offset_noise)
        state.last_check_step = state.step
        return fixed_batch_loss(self.diffusion, self.network_of(self.ema), self.fixed_batch, self.device,
                                self.autocast, cfg.min_snr_gamma, self.pixel_weights, cfg.microbatch)

    def _end_epoch(self, progress: _Progress, seconds: float) -> None:
        state = self.state
        state.epoch_sums = distributed.all_reduce_sum(self.running).tolist()
        loss, mse, vb = (s / max(state.epoch_count, 1) for s in state.epoch_sums)
        if not math.isfinite(loss):
            self._raise_diverged()
        fixed = self._fixed_loss()
        if fixed is not None and not math.isfinite(fixed):
            raise TrainingDiverged(self._diverged_text(f"the EMA weights' fixed-batch loss is {fixed} after step "
                                                       f"{state.step}", state.step))
        chosen_by = fixed if self.config.best_by == "fixed_batch" else loss
        is_best = chosen_by is not None and chosen_by < state.best_loss
        if is_best:  # the loss is finite, but the epoch's last update may have made the weights NaN
            self._check_finite()
            state.best_loss, state.best_epoch = chosen_by, state.epoch
            state.epochs_without_improvement = state.steps_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        progress.epochs.write({"epoch": state.epoch, "step": state.step, "loss": loss, "mse": mse, "vb": vb,
                               "fixed_loss": "" if fixed is None else fixed,
                               "best_loss": state.best_loss, "is_best": int(is_best),
                               "images_per_s": round(state.epoch_count / seconds, 3) if seconds > 0 else 0.0,
                               "seconds": round(seconds, 3)})
        fixed_scalar = {} if fixed is None else {"fixed_loss": fixed}
        progress.watch.scalars(state.step, {"loss": loss, "mse": mse, "vb": vb, **fixed_scalar,
                                            "best_loss": state.best_loss}, "epoch")
        state.epoch += 1
        state.batch_in_epoch, state.epoch_sums, state.epoch_count = 0, [0.0, 0.0, 0.0], 0
        self.running = torch.zeros(3, dtype=torch.float64, device=self.device)
        if is_best and self.world.is_main:
            ckpt.save_checkpoint(self.checkpoint_dir / "best.pt", self._payload(full=False))


def run_training(config: TrainConfig, action: str, log=print, trainer_class: type[Trainer] = Trainer) -> TrainResult:
    """`main.py train|finetune|masks`: start where the config says (auto_resume: the newest `latest.pt` of an
    earlier run of this action under root_log_dir that no other process runs or continues, held until this run
    ends; else resume_checkpoint, a file or run folder) and train with `trainer_class` (the mask generator's:
    masks.train.MaskTrainer)."""
    with ExitStack() as held:
        start = None
        if config.auto_resume:  # rank 0 looks, holds the run it continues until this run ends, and tells every rank
            def claim() -> Path | None:
                found = ckpt.find_resumable(config.root_log_dir, action, log)
                if found is None:
                    return None
                checkpoint, lock = found
                held.enter_context(lock)
                return checkpoint
            start = distributed.made_by_main(claim)
        if start is None and config.resume_checkpoint:
            prefer = "best" if action == "finetune" else "latest"
            start = ckpt.resolve_checkpoint(config.resume_checkpoint, key="resume_checkpoint", prefer=prefer,
                                            actions=("train",) if action == "finetune" else (action,))
        trainer = trainer_class(config, action, log)
        if start is not None:
            trainer.log(trainer.start_from(start))
        return trainer.run()


def train_action(config: TrainConfig, action: str, log=print, trainer_class: type[Trainer] = Trainer) -> int | None:
    """`main.py train|finetune|masks`: train (see run_training) and return the exit status: None when the run
    ended, REQUEUE_EXIT_STATUS (75) when SIGTERM/SIGUSR1 ended it with latest.pt saved, so that sbatch requeues the
    job. A diverged run raises TrainingDiverged (one line, status 2)."""
    if run_training(config, action, log, trainer_class).stop_signal:
        distributed.ignore_stop_signals()  # exit in order even when srun ends the step on another rank's exit
        return distributed.REQUEUE_EXIT_STATUS
    return None

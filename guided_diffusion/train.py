"""The training loop behind `main.py train` and `main.py finetune`.

One loop serves training from scratch, exact resume and finetuning; what differs is where it starts
(`resume_checkpoint`): a checkpoint of the same action resumes exactly (weights, EMA, optimizer, step, epoch,
position in the epoch, RNG states); a checkpoint of another action, or a plain SDM/ISDM state dict, only
initialises the weights.

Every random draw of a step (batch order, flips, timesteps, noise, null labels) comes from CPU generators whose
state is in the checkpoint, so N steps + resume + M steps gives the weights of N + M steps. The epoch loss is
the mean of the per-sample losses already computed for the epoch's batches; the checkpoint of the best epoch
(lowest loss) is kept as `checkpoints/best.pt`, the full state every `save_interval` steps as `latest.pt`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import TrainConfig, config_to_dict
from .data import SegmentationDataset, index_dataset, one_hot, split_train_val
from .diffusion import GaussianDiffusion
from .results import CsvLog, new_run_dir, write_json
from .unet import SDMUNet

STEP_FIELDS = ["step", "epoch", "loss", "mse", "vb", "lr", "images_per_s"]
EPOCH_FIELDS = ["epoch", "step", "loss", "mse", "vb", "best_loss", "is_best", "images_per_s", "seconds"]


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import ConfigError
        raise ConfigError(f"key 'device' is {name!r} but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(name)


def build_model(config) -> SDMUNet:
    return SDMUNet(config.unet_spec())


def build_diffusion(config) -> GaussianDiffusion:
    """The model's training process (diffusion_steps, usually 1000)."""
    return GaussianDiffusion.create(config.diffusion_steps, config.noise_schedule, learn_sigma=config.learn_sigma,
                                    rescale_timesteps=config.rescale_timesteps)


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
    best_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    steps_without_improvement: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    latest_checkpoint: Path
    state: TrainState
    stop_reason: str


class Trainer:
    """Holds the objects built once for a run; `run()` executes the loop."""

    def __init__(self, config: TrainConfig, action: str, log=print):
        """Validate the data and build everything; only then make the run's fresh folder under root_log_dir."""
        self.config, self.action, self.log = config, action, log
        self.device = select_device(config.device)
        torch.manual_seed(config.seed)
        index = index_dataset(config.data_dir, config.dataset_mode, config.num_classes, require_test=False)
        self.train_pairs, self.val_pairs = split_train_val(index.train, config.val_fraction, config.seed)
        self.dataset = SegmentationDataset(self.train_pairs, config.image_size, config.dataset_mode,
                                           config.resize_mode)
        self.diffusion = build_diffusion(config)
        self.model = build_model(config).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.state = TrainState()
        self.running = torch.zeros(3, dtype=torch.float64, device=self.device)  # this epoch's loss/mse/vb sums
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.autocast = config.use_fp16 and self.device.type == "cuda"
        self.run_dir = new_run_dir(config.root_log_dir, action)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.checkpoint_dir.mkdir()
        write_json(self.run_dir / "config.json", config_to_dict(config))
        log(f"run folder: {self.run_dir}")

    # --- starting point ---------------------------------------------------------------------------------
    def start_from(self, path: Path) -> str:
        """Resume exactly from a checkpoint of this action, else initialise the weights from it."""
        payload = ckpt.load_checkpoint(path)
        same_action = payload.get("action") == self.action and "optimizer" in payload
        state_dict = ckpt.extract_state_dict(payload, prefer_ema=False)
        ema_dict = ckpt.extract_state_dict(payload, prefer_ema=True)
        for net, weights in ((self.model, state_dict), (self.ema, ema_dict)):
            ckpt.load_weights(net, weights, path, "the config's model")
        if not same_action:
            return f"initialised weights from {path}"
        self.optimizer.load_state_dict(payload["optimizer"])
        earlier_best = Path(path).parent / "best.pt"
        if earlier_best.is_file():  # the best epoch so far may be in the earlier run: carry it over
            ckpt.save_checkpoint(self.checkpoint_dir / "best.pt", ckpt.load_checkpoint(earlier_best))
        self.state = TrainState(**payload["train_state"])
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
        self.state.epoch_sums = self.running.tolist()
        ckpt.save_checkpoint(self.checkpoint_dir / "latest.pt", self._payload(full=True))

    # --- one step -----------------------------------------------------------------------------------------
    def _draws(self, batch_size: int) -> dict[str, torch.Tensor]:
        g, shape = self.generator, (batch_size, 3, self.config.image_size, self.config.image_size)
        return {
            "flip": torch.rand(batch_size, generator=g) < (0.5 if self.config.random_flip else 0.0),
            "t": torch.randint(0, self.diffusion.num_timesteps, (batch_size,), generator=g),
            "noise": torch.randn(shape, generator=g),
            "keep_label": torch.rand(batch_size, generator=g) >= self.config.drop_rate,
        }

    def _lr(self) -> float:
        if self.config.lr_anneal_steps:
            return self.config.lr * max(0.0, 1 - self.state.step / self.config.lr_anneal_steps)
        return self.config.lr

    def train_step(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; returns the per-sample [loss, mse, vb] (detached)."""
        draws = self._draws(images.shape[0])
        flip = draws["flip"]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
        labels = one_hot(masks, self.config.num_classes) * draws["keep_label"][:, None, None, None].float()
        images, labels = images.to(self.device), labels.to(self.device)
        t, noise = draws["t"].to(self.device), draws["noise"].to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        chunk = self.config.microbatch if self.config.microbatch > 0 else images.shape[0]
        per_sample = []
        for start in range(0, images.shape[0], chunk):
            sl = slice(start, start + chunk)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                terms = self.diffusion.training_losses(lambda x, ts: self.forward(x, ts, labels[sl]), images[sl],
                                                       t[sl], noise[sl])
            (terms["loss"].sum() / images.shape[0]).backward()
            per_sample.append(torch.stack([terms["loss"], terms["mse"], terms["vb"]], dim=1).detach().float())
        self.optimizer.step()
        self._update_ema()
        return torch.cat(per_sample)

    @torch.no_grad()
    def _update_ema(self) -> None:
        rate = self.config.ema_rate
        if self.config.ema_warmup:  # early on, average over ~step/10 recent steps, not over the random init
            rate = min(rate, (1 + self.state.step) / (10 + self.state.step))
        ema_params = list(self.ema.parameters())
        params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - rate)

    # --- the loop -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, state = self.config, self.state
        step_log = CsvLog(self.run_dir / "log.csv", STEP_FIELDS)
        epoch_log = CsvLog(self.run_dir / "epochs.csv", EPOCH_FIELDS)
        num_items = len(self.dataset)
        batches_per_epoch = math.ceil(num_items / cfg.batch_size)
        total = cfg.max_epochs * batches_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        self.log(f"training on {num_items} images ({len(self.val_pairs)} held out for validation), "
                 f"{batches_per_epoch} batches of {cfg.batch_size} per epoch, device {self.device}")
        stop_reason = "max_epochs reached"
        bar = tqdm(total=total, initial=min(state.step, total), desc=self.action, unit="step", dynamic_ncols=True)
        window_images, window_start = 0, time.perf_counter()
        epoch_start = time.perf_counter()
        try:
            while state.epoch < cfg.max_epochs:
                order = epoch_order(num_items, cfg.seed, state.epoch)
                self.running = torch.tensor(state.epoch_sums, dtype=torch.float64, device=self.device)
                for b in range(state.batch_in_epoch, batches_per_epoch):
                    if cfg.max_steps and state.step >= cfg.max_steps:
                        stop_reason = "max_steps reached"
                        break
                    indices = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    items = [self.dataset[i] for i in indices]
                    images = torch.stack([it["image"] for it in items])
                    masks = torch.stack([it["mask"] for it in items])
                    per_sample = self.train_step(images, masks)
                    self.running += per_sample.sum(0).double()
                    state.step += 1
                    state.batch_in_epoch = b + 1
                    state.epoch_count += len(indices)
                    window_images += len(indices)
                    bar.update(1)
                    if state.step % cfg.log_interval == 0:
                        means = (per_sample.mean(0)).tolist()
                        elapsed = time.perf_counter() - window_start
                        speed = window_images / elapsed if elapsed > 0 else 0.0
                        step_log.write({"step": state.step, "epoch": state.epoch, "loss": means[0], "mse": means[1],
                                        "vb": means[2], "lr": self._lr(), "images_per_s": round(speed, 3)})
                        bar.set_postfix(loss=f"{means[0]:.4f}", img_s=f"{speed:.1f}")
                        window_images, window_start = 0, time.perf_counter()
                    if cfg.patience_unit == "steps":
                        state.steps_without_improvement += 1
                    if state.step % cfg.save_interval == 0:
                        self.save_latest()
                    if cfg.patience and cfg.patience_unit == "steps" and state.steps_without_improvement >= cfg.patience:
                        stop_reason = f"no improvement for {cfg.patience} steps"
                        break
                if state.batch_in_epoch < batches_per_epoch:
                    break  # stopped inside the epoch (max_steps or step patience)
                self._end_epoch(epoch_log, time.perf_counter() - epoch_start)
                epoch_start = time.perf_counter()
                if cfg.patience and cfg.patience_unit == "epochs" and state.epochs_without_improvement >= cfg.patience:
                    stop_reason = f"no improvement for {cfg.patience} epochs"
                    break
            self.save_latest()
        except KeyboardInterrupt:
            self.save_latest()
            self.log(f"interrupted: saved {self.checkpoint_dir / 'latest.pt'}")
            raise
        finally:
            bar.close()
            step_log.close()
            epoch_log.close()
        best = self.checkpoint_dir / "best.pt"
        if not best.exists():  # stopped before the first epoch ended: the latest weights are all we have
            ckpt.save_checkpoint(best, self._payload(full=False))
        summary = {"stop_reason": stop_reason, "steps": state.step, "epochs_completed": state.epoch,
                   "best_epoch": state.best_epoch, "best_loss": state.best_loss if math.isfinite(state.best_loss) else None}
        write_json(self.run_dir / "summary.json", summary)
        self.log(f"{stop_reason}; best epoch {state.best_epoch} (loss {state.best_loss:.5f}); "
                 f"checkpoints in {self.checkpoint_dir}")
        return TrainResult(self.run_dir, best, self.checkpoint_dir / "latest.pt", state, stop_reason)

    def _end_epoch(self, epoch_log: CsvLog, seconds: float) -> None:
        state = self.state
        state.epoch_sums = self.running.tolist()
        loss, mse, vb = (s / max(state.epoch_count, 1) for s in state.epoch_sums)
        is_best = loss < state.best_loss
        if is_best:
            state.best_loss, state.best_epoch = loss, state.epoch
            state.epochs_without_improvement = state.steps_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        epoch_log.write({"epoch": state.epoch, "step": state.step, "loss": loss, "mse": mse, "vb": vb,
                         "best_loss": state.best_loss, "is_best": int(is_best),
                         "images_per_s": round(state.epoch_count / seconds, 3) if seconds > 0 else 0.0,
                         "seconds": round(seconds, 3)})
        state.epoch += 1
        state.batch_in_epoch, state.epoch_sums, state.epoch_count = 0, [0.0, 0.0, 0.0], 0
        self.running = torch.zeros(3, dtype=torch.float64, device=self.device)
        if is_best:
            ckpt.save_checkpoint(self.checkpoint_dir / "best.pt", self._payload(full=False))

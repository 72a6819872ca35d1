"""Typed, strict configs: one dataclass per action, loaded from ISDM-style flat JSON files.

Keys keep ISDM's (and guided-diffusion's) names. Every key is written once, as a field made by `option`: its
default, its meaning and its ISDM/SDM name; `python main.py keys` and docs/configuration.md are generated from the
fields (guided_diffusion/keys.py). A key that is unknown, of the wrong type or out of range raises a one-line
`ConfigError` naming the file and the key. A key of another of ISDM's actions (train, finetune, sample share one
flat key set there) and an ISDM/SDM key without effect here are accepted and reported in one note line.

The nested objects of a sample config are dataclasses of this module too: `balance_args` (BalanceArgs) and
`hardness_args` (HardnessArgs); the object `hardness_args.scorer` is kept as given, for evaluation/ to read (the
scorer is evaluation's). Every config, nested or not, is read by the one routine of config_io.py (types, aliases,
unknown keys) and then checked by its `validate()`, which only checks; ISDM's spellings that set another key
(`use_fp16`, `use_ddim`) are translated where the file is read (`config_from_dict`). This module imports no other
config user (balance.py and sampling/hardness.py import it), so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .config_io import did_you_mean, read, read_config_file, require, setting, to_json_dict, within
from .data import canonical_dataset_mode
from .errors import ConfigError
from .unet import UNetSpec

ACTIONS = ("train", "finetune", "masks", "sample", "export", "import")

# ISDM/SDM keys that have no effect here; accepted so old configs keep working, and reported in the log.
IGNORED_LEGACY_KEYS = {
    "is_train": "the action on the command line decides",
    "fp16_scale_growth": "mixed precision uses bf16 autocast, which needs no loss scaling",
    "schedule_sampler": "timesteps are sampled uniformly",
    "use_kl": "the hybrid loss (MSE + VB) is always used",
    "predict_xstart": "the model predicts eps",
    "rescale_learned_sigmas": "the VB term is not rescaled (guided-diffusion's default)",
    "results_path": "outputs go to a fresh run folder under root_log_dir",
    "log_dir": "outputs go to a fresh run folder under root_log_dir",
}
MODEL_KEYS = ("image_size", "num_classes", "num_channels", "num_res_blocks", "channel_mult",
              "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample", "resblock_updown",
              "use_scale_shift_norm", "learn_sigma", "dropout", "use_new_attention_order", "noise_schedule",
              "image_channels")


def parse_number_list(value: str | list[int] | list[float], key: str, number=int) -> tuple:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return tuple(number(p) for p in parts)
        except ValueError:
            raise ConfigError(f"key '{key}': expected comma-separated numbers, got {value!r}") from None
    return tuple(number(v) for v in value)


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """guided-diffusion's channel multipliers per resolution; small images get a short UNet."""
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size in table:
        return table[image_size]
    return (1, 2, 2) if image_size <= 32 else (1, 2, 2, 4)


PAINTING_MODES = ("inpaint", "harmonize", "blend")
"""Sample modes that paint a region of a placed mask with the model (RePaint): `inpaint_margin`, `resample_steps`."""
PLACING_MODES = (*PAINTING_MODES, "paste")
"""Sample modes that put the masks' defects onto defect-free backgrounds (background_dir, pairing, placement)."""
STRENGTH_MODES = ("variation", *PAINTING_MODES)
"""Sample modes that may start from a noised image instead of pure noise (`strength`)."""

SAME = "same"  # ISDM/SDM use the same key name
NO_ISDM = "—"  # ISDM/SDM have no such key


def option(default: Any = dataclasses.MISSING, doc: str = "", isdm: str = NO_ISDM, *,
           factory: Any = dataclasses.MISSING, alias: str = "", canonical: Any = None, expect: str = "") -> Any:
    """A config key: its default, its meaning (`doc`), its ISDM/SDM name (`isdm`: SAME, NO_ISDM or a note), an
    accepted alternative spelling (`alias`), the function giving a value's one form (`canonical`) and the expected
    value in words (`expect`; both see config_io.setting). The one place each is written: `python main.py keys` and
    docs/configuration.md are generated from these fields (of the action configs and of the nested objects), and
    the loader takes the aliases from them."""
    if not doc:
        raise TypeError("a config key needs its doc")
    return setting(default, factory=factory, alias=alias, canonical=canonical, expect=expect, doc=doc, isdm=isdm)


def _dataset_mode(value: str, key: str) -> str:
    return canonical_dataset_mode(value)  # ISDM's names (lemon-binary, ...) -> binary / multi-class


@dataclass
class CommonConfig:
    """Keys shared by every action: data, model shape, diffusion, run folder."""

    data_dir: str = option("", "dataset folder with `train/` and `test/` (required)", SAME)
    dataset_mode: str = option("multi-class", "`multi-class` or `binary` (masks of 0/255); ISDM's names are accepted",
                               "same; values `lemon-multi-class`, `lemon-binary`", canonical=_dataset_mode)
    num_classes: int | None = option(None, "classes incl. background; required for training (sample: taken from "
                                           "the checkpoint)", SAME)
    ignore_index: int | None = option(
        None, "mask value of void / unlabelled pixels (e.g. 255; multi-class only), or null for none: accepted in "
              "masks besides the class ids; the model is conditioned on no class there (the null label's zeros) "
              "and written labels keep the value, which evaluation skips with the same ignore_index; sample: the "
              "checkpoint's when not given")
    image_size: int = option(256, "side of the square images the model works at", SAME)
    resize_mode: Literal["resize", "crop"] = option("resize", "`resize` (stretch) or `crop` (short side + centre crop)")
    val_fraction: float = option(0.2, "share of train/ held out (unseen masks for sampling)", "— (fixed 80/20)")
    seed: int = option(0, "data split, batch order, noise, per-image sample seeds", "— (`main.py -s`)")
    batch_size: int = option(8, "images per step / per sampling batch", SAME)
    device: str = option("auto", "`auto`, `cpu`, `cuda`, `cuda:N`")
    root_log_dir: str = option("Results", "where the run folders `<action>_NNN/` are made", SAME)
    # model (names as in guided-diffusion / SDM / ISDM)
    num_channels: int = option(256, "UNet base channels (a multiple of 32)", SAME)
    num_res_blocks: int = option(2, "residual blocks per UNet level", SAME)
    channel_mult: str | list[float] = option(
        "", "channel multiplier per UNet level, `\"1,2,2\"` or `[1, 2, 2]`; `\"\"` = guided-diffusion's default for "
            "`image_size`", SAME)
    attention_resolutions: str | list[int] = option("32,16,8", "resolutions (image_size / 2^k) with self-attention, "
                                                               "`\"32,16,8\"` or `[32, 16, 8]`", SAME)
    num_heads: int = option(1, "attention heads (when `num_head_channels` is -1)", SAME)
    num_head_channels: int = option(64, "channels per attention head (-1 = use `num_heads`)", SAME)
    num_heads_upsample: int = option(-1, "attention heads in the decoder (-1 = `num_heads`)", SAME)
    resblock_updown: bool = option(True, "residual blocks for up- and downsampling", SAME)
    use_scale_shift_norm: bool = option(True, "the timestep embedding scales and shifts the normalised features", SAME)
    learn_sigma: bool = option(True, "the model also predicts the variance (the VB term of the hybrid loss)", SAME)
    dropout: float = option(0.0, "dropout in the residual blocks", SAME)
    use_checkpoint: bool = option(False, "gradient checkpointing (less memory, slower)", SAME)
    use_fp16: bool = option(False, "ISDM's spelling of `precision: \"auto\"` (bf16 autocast where native, no fp16 "
                                   "loss scaler)", "same (fp16 + loss scaler there)")
    precision: Literal["fp32", "bf16", "auto"] = option(
        "fp32", "`fp32`; `bf16` (bf16 autocast on CUDA, and on a CPU with bf16 support); `auto` (bf16 where it is "
                "native and faster: bf16 GPUs and CPUs with bf16 instructions, else fp32)")
    use_new_attention_order: bool = option(False, "guided-diffusion's newer attention (split qkv before the heads)",
                                           SAME)
    image_channels: Literal["auto", 1, 3] = option(
        "auto", "`1` (grayscale: 8-bit grey pngs), `3` (RGB) or `auto`: training takes 1 when every train/ image is "
                "grey, else 3, and stores the number in `config.json` and the checkpoint; sampling takes the "
                "checkpoint's (3 when it records none, as ISDM/SDM files)", "— (3)")
    no_instance: bool = option(True, "must be true: instance edge maps are not supported", SAME)
    class_cond: bool = option(True, "must be true: the model is always conditioned on the mask", SAME)
    # diffusion
    noise_schedule: Literal["linear", "cosine"] = option("linear", "`linear` or `cosine` beta schedule", SAME)
    diffusion_steps: int = option(1000, "steps of the model's diffusion process", SAME)
    rescale_timesteps: bool = option(True, "feed the model timesteps scaled to its 1000-step range", SAME)

    def unet_spec(self) -> UNetSpec:
        mult = (parse_number_list(self.channel_mult, "channel_mult", float) if self.channel_mult
                else default_channel_mult(self.image_size))
        mult = tuple(int(m) if float(m).is_integer() else m for m in mult)
        resolutions = parse_number_list(self.attention_resolutions, "attention_resolutions")
        return UNetSpec(
            image_size=self.image_size, num_classes=self.num_classes, model_channels=self.num_channels,
            num_res_blocks=self.num_res_blocks, channel_mult=mult,
            attention_ds=tuple(self.image_size // r for r in resolutions if r > 0),
            num_heads=self.num_heads, num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample, resblock_updown=self.resblock_updown,
            use_scale_shift_norm=self.use_scale_shift_norm, learn_sigma=self.learn_sigma, dropout=self.dropout,
            use_checkpoint=self.use_checkpoint, use_new_attention_order=self.use_new_attention_order,
            # "auto" not yet resolved (training resolves it from the data, sampling from the checkpoint): ISDM's 3
            in_channels=self.image_channels if isinstance(self.image_channels, int) else 3)

    def model_keys(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_KEYS}

    def validate(self) -> None:
        require(bool(self.data_dir), "data_dir", "is required: the folder with train/ and test/")
        if self.num_classes is not None:
            require(self.num_classes >= 2, "num_classes",
                    f"must be at least 2 (background + 1 class), got {self.num_classes}")
            if self.dataset_mode == "binary":
                require(self.num_classes == 2, "num_classes",
                        f"must be 2 for dataset_mode binary, got {self.num_classes}")
        if self.ignore_index is not None:
            require(isinstance(self.ignore_index, int) and not isinstance(self.ignore_index, bool)
                    and 0 <= self.ignore_index <= 255, "ignore_index",
                    f"must be a mask value 0..255 or null, got {self.ignore_index!r}")
            require(self.dataset_mode == "multi-class", "ignore_index",
                    "needs dataset_mode multi-class (binary masks are 0 and 255 alone)")
            require(self.num_classes is None or self.ignore_index >= self.num_classes, "ignore_index",
                    f"is {self.ignore_index}, a class id of the {self.num_classes} classes; void pixels need a value "
                    f"of their own (e.g. 255)")
        require(self.image_size >= 8, "image_size", f"must be at least 8, got {self.image_size}")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        require(self.num_channels >= 32 and self.num_channels % 32 == 0, "num_channels",
                f"must be a positive multiple of 32 (GroupNorm uses 32 groups), got {self.num_channels}")
        require(self.num_res_blocks >= 1, "num_res_blocks", f"must be at least 1, got {self.num_res_blocks}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.no_instance, "no_instance", "must be true: instance edge maps are not supported")
        require(self.class_cond, "class_cond", "must be true: the model is always conditioned on the mask")
        require(self.diffusion_steps >= 1, "diffusion_steps", f"must be at least 1, got {self.diffusion_steps}")
        if self.noise_schedule == "linear" and not getattr(self, "timestep_respacing", ""):
            # The linear schedule scaled to N steps ends at beta = 0.02 * 1000 / N, which must stay below 1.
            require(self.diffusion_steps >= 21, "diffusion_steps",
                    f"must be at least 21 with the linear schedule (its last beta is 20 / diffusion_steps), got "
                    f"{self.diffusion_steps}; for fewer sampling steps set timestep_respacing (e.g. \"ddim10\")")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        spec = self.unet_spec()
        require(all(m > 0 and float(m * self.num_channels).is_integer() for m in spec.channel_mult), "channel_mult",
                f"must be positive multipliers, got {self.channel_mult!r}")
        for m in spec.channel_mult:
            require(int(m * self.num_channels) % 32 == 0, "channel_mult",
                    f"num_channels x {m} = {m * self.num_channels} is not a multiple of 32")
        require(self.image_size % spec.downsampling == 0, "image_size",
                f"must be a multiple of {spec.downsampling} (the UNet downsamples {len(spec.channel_mult) - 1} "
                f"times with channel_mult {list(spec.channel_mult)}), got {self.image_size}")
        resolutions = parse_number_list(self.attention_resolutions, "attention_resolutions")
        for r in resolutions:
            require(r > 0 and self.image_size % r == 0 and (self.image_size // r) & (self.image_size // r - 1) == 0,
                    "attention_resolutions", f"{r} is not image_size / 2^k for image_size {self.image_size}")
        if self.num_head_channels != -1:
            for m in spec.channel_mult:
                ch = int(m * self.num_channels)
                require(self.num_head_channels > 0 and ch % self.num_head_channels == 0, "num_head_channels",
                        f"{self.num_head_channels} does not divide the {ch} channels of a level")
        else:
            require(self.num_heads >= 1, "num_heads", f"must be at least 1, got {self.num_heads}")


@dataclass
class TrainConfig(CommonConfig):
    """`main.py train`: epoch-based training; the best epoch (lowest loss, see `best_by`) is kept."""

    lr: float = option(1e-4, "AdamW learning rate", SAME)
    weight_decay: float = option(0.0, "AdamW weight decay", "`weights_decay` (accepted) or `weight_decay`",
                                 alias="weights_decay")
    ema_rate: float = option(0.9999, "EMA of the weights (sampling uses it)", SAME)
    ema_warmup: bool = option(True, "EMA rate min(ema_rate, (1+step)/(10+step)) so short runs do not average in the "
                                    "random init; the cap reaches 0.999 at step 8,990 and 0.9999 at step 89,990, so "
                                    "a shorter run gives the same weights with either (the log says so)", "— (off)")
    max_epochs: int = option(100, "stop after this many epochs")
    max_steps: int = option(0, "stop after this many steps (0 = no step limit)")
    best_by: Literal["fixed_batch", "epoch_loss"] = option(
        "fixed_batch", "what picks the best epoch (`checkpoints/best.pt`): `fixed_batch` = the EMA weights' loss on "
                       "one batch of 32 fixed items, timesteps and noises, checked at an epoch's end every few epochs "
                       "(under 5 % of the training time); `epoch_loss` = the epoch's mean training loss (ISDM's; it "
                       "swings with the random timesteps on small data)", "— (`epoch_loss`)")
    patience: int = option(0, "stop after `patience` epochs (or steps) without a better best epoch; 0 = off")
    patience_unit: Literal["epochs", "steps"] = option("epochs", "what `patience` counts: `epochs` or `steps`")
    save_interval: int = option(1000, "write `checkpoints/latest.pt` every N steps (and at the end)", SAME)
    log_interval: int = option(10, "a row of `log.csv` every N steps", SAME)
    tensorboard: bool = option(True, "TensorBoard events in the run's `tensorboard/` when the package is installed: "
                                     "log.csv's numbers, EMA rate and gradient norm every `log_interval` steps, "
                                     "epoch losses, previews (docs/training.md#watching-training)")
    preview_interval: int | Literal["auto"] = option(
        "auto", "every N steps a preview grid (4 fixed held-out masks | their samples: EMA weights, ancestral 50 "
                "steps) in `previews/step_NNNNNN.png` and TensorBoard; `auto` = about 10 per run, at least 834 "
                "steps apart at batch 4 or more (1,667 with finetune's guidance), under 2 % of the training time; "
                "0 = off", expect='a number of steps (0 = off) or "auto"')
    resume_checkpoint: str = option("", "a checkpoint, run folder or folder of runs: of this action = resume "
                                        "exactly; a train run = start from its weights", SAME)
    auto_resume: bool = option(False, "resume from the newest `latest.pt` of this action under `root_log_dir`, "
                                      "but for runs another process is still running or continuing (they hold "
                                      "their run.lock)")
    drop_rate: float = option(0.0, "probability that a sample's mask is replaced by the null (all-zero) label", SAME)
    random_flip: bool = option(True, "random horizontal flips")
    lr_anneal_steps: int = option(0, "linear decay of lr to 0 over N steps (0 = off)", SAME)
    microbatch: int = option(-1, "split each batch for gradient accumulation (-1 = off)", SAME)
    compile: bool = option(False, "`torch.compile` the model")
    data_threads: int = option(4, "background threads that decode and resize the first epoch's images ahead of its "
                                  "steps (each image is kept in memory, resized, after its first load; 0 = load "
                                  "each batch in its step; `masks` loads every mask before it trains)")
    # levers for small models on a small budget (0 = off)
    crop_size: int = option(0, "train on random `crop_size` x `crop_size` crops (image and mask alike) of the "
                               "`image_size` images; sampling still makes full-size images; a multiple of the UNet's "
                               "downsampling (0 = off)")
    min_snr_gamma: float = option(0.0, "Min-SNR-gamma weight min(SNR(t), gamma) / SNR(t) of the MSE term (Hang et al. "
                                       "2023; 5 is usual); the VB term and the logged `mse` stay unweighted (0 = off)")
    lr_warmup_steps: int = option(0, "linear lr warm-up over the first N steps, times `lr_anneal_steps`' decay when "
                                     "both are set (0 = off)")
    offset_noise: float = option(0.0, "add `offset_noise` x a per-image, per-channel N(0, 1) constant to the training "
                                      "noise, so the model learns mean brightness and colour (0.1 is usual; 0 = off)")

    def validate(self) -> None:
        super().validate()
        require(self.num_classes is not None, "num_classes", "is required for training")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.ema_rate < 1.0, "ema_rate", f"must be in [0, 1), got {self.ema_rate}")
        require(self.max_epochs >= 1, "max_epochs", f"must be at least 1, got {self.max_epochs}")
        require(self.max_steps >= 0, "max_steps", f"must be >= 0 (0 = no limit), got {self.max_steps}")
        require(self.patience >= 0, "patience", f"must be >= 0 (0 = off), got {self.patience}")
        require(self.save_interval >= 1, "save_interval", f"must be at least 1, got {self.save_interval}")
        require(self.log_interval >= 1, "log_interval", f"must be at least 1, got {self.log_interval}")
        require(self.preview_interval == "auto" or self.preview_interval >= 0, "preview_interval",
                f"must be a number of steps (0 = off) or \"auto\", got {self.preview_interval}")
        require(0.0 <= self.drop_rate < 1.0, "drop_rate", f"must be in [0, 1), got {self.drop_rate}")
        require(self.lr_anneal_steps >= 0, "lr_anneal_steps", f"must be >= 0, got {self.lr_anneal_steps}")
        require(self.data_threads >= 0, "data_threads", f"must be >= 0 (0 = load in the step), got {self.data_threads}")
        require(self.microbatch == -1 or 1 <= self.microbatch, "microbatch",
                f"must be -1 (off) or a positive size, got {self.microbatch}")
        require(self.diffusion_steps >= 2, "diffusion_steps", "must be at least 2 for training")
        if self.crop_size:
            factor = self.unet_spec().downsampling
            require(0 < self.crop_size <= self.image_size and self.crop_size % factor == 0, "crop_size",
                    f"must be 0 (off) or a multiple of {factor} (the UNet's downsampling) up to image_size "
                    f"{self.image_size}, got {self.crop_size}")
        require(math.isfinite(self.min_snr_gamma) and self.min_snr_gamma >= 0, "min_snr_gamma",
                f"must be >= 0 (0 = off; the paper uses 5), got {self.min_snr_gamma}")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", f"must be >= 0 (0 = off), got {self.lr_warmup_steps}")
        require(math.isfinite(self.offset_noise) and self.offset_noise >= 0, "offset_noise",
                f"must be >= 0 (0 = off; 0.1 is usual), got {self.offset_noise}")


@dataclass
class FinetuneConfig(TrainConfig):
    """`main.py finetune`: training initialised from a checkpoint, with null-label dropout for guidance."""

    lr: float = option(2e-5, "AdamW learning rate", SAME)
    resume_checkpoint: str = option("", "the checkpoint (or train run folder, or folder of runs) to finetune "
                                        "(required); a finetune run = resume it exactly", SAME)
    drop_rate: float = option(0.2, "probability that a sample's mask is replaced by the null (all-zero) label, so "
                                   "that sampling can use guidance", SAME)

    def validate(self) -> None:
        super().validate()
        require(bool(self.resume_checkpoint), "resume_checkpoint",
                "is required: the checkpoint (or train run folder) to finetune")


@dataclass
class MaskTrainConfig(TrainConfig):
    """`main.py masks`: train a mask generator, a diffusion model over the dataset's train/ masks (masks/model.py).

    The training keys are train's (run folders `masks_NNN/`); the defaults make a small 64 px model that trains in
    minutes on a CPU. Its `image_channels` are set to num_classes (its input is the one-hot mask) and its
    `drop_rate` to `presence_drop`, where the file is read."""

    image_size: int = option(64, "side of the square masks the generator makes (sampling upsamples them to the "
                                 "image model's size)")
    val_fraction: float = option(0.0, "share of train/ held out (0: the generator learns every train/ mask)")
    batch_size: int = option(16, "masks per step")
    num_channels: int = option(32, "UNet base channels (a multiple of 32)")
    num_res_blocks: int = option(1, "residual blocks per UNet level")
    channel_mult: str | list[float] = option("1,2,2,2", "channel multiplier per UNet level")
    attention_resolutions: str | list[int] = option("8", "resolutions (image_size / 2^k) with self-attention")
    num_head_channels: int = option(32, "channels per attention head (-1 = use `num_heads`)")
    noise_schedule: Literal["linear", "cosine"] = option("cosine", "`cosine` or `linear` beta schedule")
    prediction: Literal["eps", "v"] = option("v", "what the network predicts: `v` (Salimans and Ho 2022), whose x0 "
                                                  "estimate stays well conditioned at the top noise levels, where "
                                                  "masks take shape, or `eps` (the noise, as the SDM; generators "
                                                  "trained before 2026-12-03 predict eps)")
    image_channels: int | Literal["auto"] = option(
        "auto", "the UNet's input channels: the one-hot mask's, num_classes (`auto` = num_classes; leave it out)")
    lr: float = option(3e-4, "AdamW learning rate")
    ema_rate: float = option(0.999, "EMA of the weights (sampling uses it)")
    max_epochs: int = option(200, "stop after this many epochs")
    save_interval: int = option(500, "write `checkpoints/latest.pt` every N steps (and at the end)")
    drop_rate: float = option(0.0, "the null-label dropout: set from `presence_drop` (leave it out)")
    preview_interval: int | Literal["auto"] = option(0, "must be 0: the mask generator makes no previews (a sample "
                                                        "run's masks_report.md shows its masks)",
                                                     expect="0 (the mask generator makes no previews)")
    class_weight_power: float = option(0.25, "weight each pixel's squared error in the loss by (share of its "
                                             "class among the training masks' pixels)^-power, the weights averaging "
                                             "1 over those pixels, so small, rare classes count more; 0 = off (the "
                                             "plain loss), 1 = every class counts as much in total. With `prediction` "
                                             "v, 0.25 brought the generated masks' class pixel shares and the share "
                                             "of masks holding each class to the real ones on magnetic-tile; with "
                                             "eps it fills every mask with every class: use 0 with eps "
                                             "(docs/mask_generator.md)")
    presence_drop: float = option(0.1, "probability that a mask's presence vector (the classes it holds) is replaced "
                                       "by the null vector, so sampling may ask for no class or use guidance; sets "
                                       "`drop_rate`")

    def validate(self) -> None:
        require(0.0 <= self.presence_drop < 1.0, "presence_drop", f"must be in [0, 1), got {self.presence_drop}")
        require(0.0 <= self.class_weight_power <= 1.0, "class_weight_power",
                f"must be in [0, 1] (0 = off), got {self.class_weight_power}")
        super().validate()
        require(self.ignore_index is None, "ignore_index",
                f"is {self.ignore_index}, but the mask generator has no void class: it learns masks of class ids "
                f"alone; train it on masks without void pixels, or sample from dataset masks (no mask_source)")
        require(self.drop_rate == self.presence_drop, "drop_rate",
                f"is set from 'presence_drop' for the mask generator; give presence_drop {self.drop_rate} instead")
        require(self.preview_interval == 0, "preview_interval",
                f"must be 0: the mask generator makes no previews (got {json.dumps(self.preview_interval)}); "
                f"leave it out")
        require(self.image_channels == self.num_classes, "image_channels",
                f"is the generator's input: the one-hot mask's num_classes ({self.num_classes}) channels; leave it "
                f"out")


def mask_generator_keys(config: Any) -> Any:
    """The mask generator's keys that follow from others, set where the file is read (as `isdm_spellings`):
    `image_channels` "auto" = num_classes (the UNet's input is the one-hot mask), and `drop_rate` (the Trainer's
    null-label dropout) = `presence_drop` when not given. Other values are left to validate() to refuse."""
    if not isinstance(config, MaskTrainConfig):
        return config
    if config.image_channels == "auto" and config.num_classes is not None:
        config = dataclasses.replace(config, image_channels=config.num_classes)
    if config.drop_rate == 0.0:
        config = dataclasses.replace(config, drop_rate=config.presence_drop)
    return config


# ---------------------------------------------------------------------------------------------------------------
# The nested objects of a sample config: balance_args and hardness_args


@dataclass(frozen=True)
class BalanceArgs:
    """The `balance_args` sub-keys of a sample config (ISDM's names), with their defaults (docs/balancing.md)."""

    max_class_dif: float = option(0.1, "largest allowed relative difference between the classes' shares, (max - "
                                       "min) / min (docs/balancing.md); >= 0", SAME)
    based_on_generated_data_only: bool = option(False, "balance the synthetic set alone (`true`) or real + synthetic "
                                                       "(`false`: the real counts are the starting point)", SAME)
    based_on_pixel_count: bool = option(True, "count pixels per class (`true`) or objects: 8-connected components "
                                              "per class (`false`)", SAME)
    ejection_classes: tuple[int, ...] = option((0,), "class ids that take no part (the background); any list of ids "
                                                     "in `0..num_classes-1`", SAME,
                                               expect="a list of class ids (integers)",
                                               canonical=lambda ids, key: tuple(sorted(set(ids))))
    use_mask_augmentation: bool = option(False, "make new masks when the existing ones cannot reach the balance "
                                                "(docs/balancing.md)", SAME)

    def validate(self, num_classes: int | None = None) -> None:
        """Class ids in ejection_classes are checked against num_classes when it is known (a sample config takes
        it from the checkpoint, and is validated again once it is merged)."""
        require(self.max_class_dif >= 0, "max_class_dif", f"must be >= 0 (the largest allowed (max - min) / min of "
                                                          f"the class shares), got {self.max_class_dif}")
        allowed = f"0..{num_classes - 1} (num_classes {num_classes})" if num_classes is not None else ">= 0"
        for class_id in self.ejection_classes:
            require(class_id >= 0 and (num_classes is None or class_id < num_classes), "ejection_classes",
                    f"holds class id {class_id}, outside {allowed}")
        require(num_classes is None or not set(range(num_classes)) <= set(self.ejection_classes), "ejection_classes",
                f"ejects all {num_classes} classes; leave at least one class to balance")

    def to_dict(self) -> dict[str, Any]:
        """The resolved sub-keys as JSON values (what a run's config.json records)."""
        return to_json_dict(self)

    def participating(self, num_classes: int) -> list[int]:
        """The class ids whose shares are balanced: every class not ejected."""
        return [c for c in range(num_classes) if c not in self.ejection_classes]


DEFAULT_SCORER_DIR = "Results/scorers"


@dataclass(frozen=True)
class HardnessArgs:
    """The `hardness_args` sub-keys of a sample config, with their defaults (docs/filtering.md).

    `scorer` holds the scorer's training settings (part of the cache key; image_size null = the sampling
    image_size), so the scorer that filters a sample run is the one found here when both use the defaults. The
    scorer is evaluation's (the caller hands it in, sampling/hardness.py): this package keeps the object as it is
    given, and evaluation/segmenter/settings.py reads and checks its keys, which main.py and the study do before
    any work."""

    exponent: float = option(1.0, "weight = (hardness / mean hardness)^exponent; 0 = all masks alike, larger = hard "
                                  "masks still more often; >= 0", expect="a number >= 0 (0 = hardness has no effect)")
    scorer_dir: str = option(DEFAULT_SCORER_DIR, "the scorer cache", expect="a folder path")
    allow_training: bool = option(False, "train the scorer when the cache has none (else a one-line error with the "
                                         "command that trains it)")
    scorer: dict[str, Any] = option(doc="scorer settings, an object of its own keys "
                                        "([`hardness_args.scorer`](#hardness_argsscorer)); part of the cache key; "
                                        "`{}` = the defaults, `image_size` = the sampling `image_size`",
                                    factory=dict, expect="an object of scorer settings")

    def validate(self) -> None:
        require(self.exponent >= 0, "exponent", f"must be a number >= 0 (0 = hardness has no effect), got "
                                                f"{json.dumps(self.exponent)}")
        require(bool(self.scorer_dir), "scorer_dir", f"must be a folder path, got {json.dumps(self.scorer_dir)}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved sub-keys (what a run's config.json records)."""
        return to_json_dict(self)


@dataclass
class SampleConfig(CommonConfig):
    """`main.py sample`: synthesise images for masks from the dataset with a trained model."""

    model_path: str = option("", "checkpoint file, run folder or folder of runs (its EMA weights are used); required "
                                 "except with `mode: \"paste\"`", SAME)
    num_samples: int = option(16, "images to synthesise", SAME)
    s: float = option(1.5, "classifier-free guidance scale (1 = none; needs a finetuned model)", SAME)
    guidance_interval: list[float] | None = option(
        None, "`[low, high]`: guide only the steps whose diffusion time t/T is in [low, high] (0 = clean, 1 = pure "
              "noise); the others run the conditional model alone, one forward instead of two (Kynkäänniemi et al. "
              "2024); null = every step; no effect with `s` 1. See [docs/sampling.md](sampling.md#guidance-interval)")
    diffusion_steps: int = option(300, "steps of the rescaled schedule (a linear schedule over N steps, timesteps "
                                       "rescaled to the model's 0..1000)", SAME)
    timestep_respacing: str | int = option("", "instead: respace the model's own process, e.g. `50` or `\"ddim50\"` "
                                               "(not with `steps`)", SAME)
    sampler: Literal["ancestral", "ddim", "dpm++2m"] = option(
        "ancestral", "`ancestral` (DDPM, learned variance), `ddim`, or `dpm++2m` (DPM-Solver++(2M), deterministic)")
    steps: int = option(0, "model evaluations per image: 0 = the sampler's default (ancestral/ddim: the schedule "
                           "above; dpm++2m: 20); N > 0 = N steps of the model's own process")
    use_ddim: bool = option(False, "ISDM's spelling of `sampler: \"ddim\"`", SAME)
    ddim_eta: float = option(0.0, "DDIM's eta (0 = deterministic)")
    clip_denoised: bool = option(True, "clip the predicted x0 to [-1, 1]", SAME)
    mask_split: Literal["train", "val", "test", "all"] = option(
        "val", "masks from `val` (held out of training), `train`, `test` or `all`")
    use_ema: bool = option(True, "sample with the EMA weights")
    auto_resume: bool = option(False, "continue the newest `sample_NNN` run under `root_log_dir` that no other "
                                      "process samples into (it would hold its run.lock), when it stopped "
                                      "before its end (no summary.json) and its config.json is this run's: the "
                                      "images it wrote are kept, the others sampled, the same as in an unbroken run; "
                                      "otherwise a new run folder (the log says why); `mode: \"paste\"` always "
                                      "starts a new one")
    balance_args: BalanceArgs | None = option(None, "class-balanced mask selection, an object of its own keys "
                                                    "([`balance_args`](#balance_args)), see "
                                                    "[docs/balancing.md](balancing.md); null = masks in dataset "
                                                    "order, cycled", SAME)
    hardness_args: HardnessArgs | None = option(None, "hardness-aware mask selection, an object of its own keys "
                                                      "([`hardness_args`](#hardness_args)), see "
                                                      "[docs/filtering.md](filtering.md); null = off")
    # variations and inpainting (sampling/inpaint.py); copy-paste without a model (sampling/paste.py)
    mode: Literal["noise", "variation", "inpaint", "harmonize", "blend", "paste"] = option(
        "noise", "`noise`, `variation` (SDEdit from the mask's real image), `inpaint` (RePaint on a defect-free "
                 "background), `harmonize` (copy-paste, then the painted region re-drawn from the pasted image at "
                 "`strength`, so the real defect blends into its new background), `blend` (copy-paste, then only "
                 "the seam, the `inpaint_margin` px around the pasted defect, painted by the model: the defect's "
                 "pixels stay real) or `paste` (copy-paste, no model)")
    strength: float = option(1.0, "noise level the run starts from, in (0, 1]; 1 = pure noise; only with `variation`, "
                                  "`inpaint`, `harmonize` (which needs it below 1: 0.3 keeps the defect's shape "
                                  "and redraws its edges) or `blend`")
    inpaint_margin: int = option(2, "pixels (at `image_size`) added around the defects to form the painted region "
                                    "(with `blend`: the painted seam, at least 1)")
    resample_steps: int = option(2, "RePaint jumps back per step (each costs one model evaluation per step); 0 = "
                                    "plain pasting")
    background_dir: str = option("", "folder of defect-free images to paint or paste on; `\"\"` = the dataset's "
                                     "train/ images whose mask is all 0; only with `inpaint`, `harmonize`, `blend` or "
                                     "`paste`")
    pairing: Literal["random", "round-robin"] = option(
        "random", "`random` (each image draws a background) or `round-robin` (a seeded shuffle of the backgrounds, "
                  "used in turn)")
    mask_flip: bool = option(False, "flip each mask horizontally and vertically, each with probability 1/2")
    mask_placement: Literal["keep", "random"] = option(
        "keep", "`keep` the mask where it is, or `random`: shift it so that its defects stay inside the image")
    # new layouts from a mask generator (masks/model.py; docs/mask_generator.md)
    mask_source: str = option("", "a mask generator (its `masks_NNN` run folder or checkpoint, from `main.py masks`): "
                                  "new masks are generated instead of taken from `mask_split`; `\"\"` = dataset masks")
    mask_classes: list[int] = option(factory=list, doc="with `mask_source`: classes every generated mask must hold "
                                                       "(e.g. a rare class); `[]` = as often as in the training masks")
    mask_guidance: float = option(1.0, "with `mask_source`: guidance scale toward the asked classes (1 = none)")
    mask_steps: int = option(25, "with `mask_source`: ancestral sampler steps per generated mask (on "
                                 "magnetic-tile, 50 steps made 5 of 16 masks mostly defect, 25 none)")
    mask_min_area: int = option(0, "with `mask_source`: components of fewer pixels are removed from the generated "
                                   "masks (filled with the class around them); 0 = keep all")
    mask_retries: int = option(0, "with `mask_source`: a generated mask that holds other classes than the presence "
                                  "vector it was drawn for (after `mask_min_area`) is drawn again with new noise, up "
                                  "to this many times, keeping the closest draw; 0 = off")

    def validate(self) -> None:
        super().validate()
        self.validate_mask_source()
        require(bool(self.model_path) or self.mode == "paste", "model_path",
                "is required: a checkpoint file or a train/finetune run folder (only mode 'paste' needs none)")
        require(self.num_samples >= 1, "num_samples", f"must be at least 1, got {self.num_samples}")
        require(self.s >= 1.0, "s", f"is the guidance scale and must be >= 1 (1 = no guidance), got {self.s}")
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            require(len(interval) == 2 and 0.0 <= interval[0] < interval[1] <= 1.0, "guidance_interval",
                    f"must be [low, high] with 0 <= low < high <= 1 (fractions of the diffusion time t/T), got "
                    f"{interval}")
        require(0.0 <= self.ddim_eta <= 1.0, "ddim_eta", f"must be in [0, 1], got {self.ddim_eta}")
        require(self.steps >= 0, "steps", f"must be >= 0 (0 = the sampler's default), got {self.steps}")
        require(not (self.steps and self.timestep_respacing), "steps",
                "and 'timestep_respacing' both choose the sampling steps; give only one")
        require(not self.use_ddim or self.sampler == "ddim", "use_ddim",  # config_from_dict made ancestral ddim
                f"is true but 'sampler' is {self.sampler!r}; remove use_ddim or set sampler to 'ddim'")
        require(0.0 < self.strength <= 1.0, "strength",
                f"must be in (0, 1] (1 = start from noise), got {self.strength}")
        require(self.mode in STRENGTH_MODES or self.strength == 1.0, "strength",
                f"applies to mode {', '.join(repr(m) for m in STRENGTH_MODES)}, but mode is {self.mode!r}; remove it "
                f"or set mode")
        require(self.mode != "harmonize" or self.strength < 1.0, "strength",
                "must be below 1 with mode 'harmonize' (at 1 the pasted defect is drowned in noise: that is mode "
                "'inpaint'); 0.3 keeps the defect and redraws its edges")
        require(self.inpaint_margin >= 0, "inpaint_margin", f"must be >= 0 pixels, got {self.inpaint_margin}")
        require(self.mode != "blend" or self.inpaint_margin >= 1, "inpaint_margin",
                "must be at least 1 with mode 'blend': it is the width of the seam the model paints around the "
                "pasted defect (0 paints nothing; 2 is the default)")
        require(self.resample_steps >= 0, "resample_steps", f"must be >= 0 (0 = no jumps), got {self.resample_steps}")
        require(self.mode in PLACING_MODES or not self.background_dir, "background_dir",
                f"is only used with mode {', '.join(repr(m) for m in PLACING_MODES)}, but mode is {self.mode!r}")
        if self.balance_args is not None:
            known = self.num_classes if self.num_classes is not None or self.dataset_mode != "binary" else 2
            with within("balance_args"):
                self.balance_args.validate(known)
        if self.hardness_args is not None:
            with within("hardness_args"):
                self.hardness_args.validate()

    def validate_mask_source(self) -> None:
        """The keys of generated masks: only with mask_source, and only for modes that need no real image."""
        if not self.mask_source:
            require(not self.mask_classes, "mask_classes", "applies to generated masks; set mask_source too")
            return
        require(self.mode in ("noise", "inpaint"), "mask_source",
                f"makes new masks for mode 'noise' or 'inpaint'; mode {self.mode!r} needs the real image of each "
                f"dataset mask")
        require(self.hardness_args is None, "hardness_args",
                "scores dataset masks and does not apply to generated ones (mask_source); remove one of them")
        allowed = f"0..{self.num_classes - 1} (num_classes {self.num_classes})" if self.num_classes else ">= 0"
        for class_id in self.mask_classes:
            require(class_id >= 0 and (self.num_classes is None or class_id < self.num_classes), "mask_classes",
                    f"holds class id {class_id}, outside {allowed}")
        require(self.mask_guidance >= 1.0, "mask_guidance",
                f"is a guidance scale and must be >= 1 (1 = none), got {self.mask_guidance}")
        require(self.mask_steps >= 2, "mask_steps", f"must be at least 2, got {self.mask_steps}")
        require(self.mask_min_area >= 0, "mask_min_area", f"must be >= 0 pixels (0 = keep all), got "
                                                          f"{self.mask_min_area}")
        require(self.mask_retries >= 0, "mask_retries", f"must be >= 0 (0 = off), got {self.mask_retries}")


EXPORT_FORMATS = ("coco", "yolo-seg", "yolo-det", "semantic")
IMPORT_FORMATS = ("coco", "palette", "id-map")


@dataclass
class ExportConfig:
    """`main.py export`: a sample run (or a dataset folder) as COCO JSON, YOLO txt and semantic masks.

    Not a CommonConfig: exporting builds no model and reads no fixed image size, so those keys would only be
    noise here."""

    source: str = option("", "sample run, dataset or split folder (required)")
    output_dir: str = option("", "an empty or new folder; `\"\"` = a fresh `<root_log_dir>/export_NNN`")
    root_log_dir: str = option("Results", "where `export_NNN` is made")
    formats: list[str] = option(factory=lambda: list(EXPORT_FORMATS),
                                doc="any of `coco`, `yolo-seg`, `yolo-det`, `semantic`")
    min_area: int = option(4, "components with fewer pixels are left out of COCO and YOLO (semantic masks keep every "
                              "pixel)")
    segmentation: Literal["auto", "polygon", "rle"] = option(
        "auto", "COCO masks: `auto` (polygon when exact, else RLE), `polygon` (always; holes filled), `rle`")
    connectivity: Literal[4, 8] = option(8, "8 (diagonal pixels join one object) or 4")
    dataset_mode: str = option("multi-class", "how a dataset source's masks are read (`binary`: 0/255)",
                               canonical=_dataset_mode)
    num_classes: int | None = option(None, "override the class count (null = from the run or `classes.json`)")
    classes_file: str = option("", "override the class names file (`\"\"` = the run's or dataset's `classes.json`)")
    max_images: int = option(0, "export only the first N images (0 = all)")
    contact_sheet: int = option(16, "images on the contact sheet (0 = none)")

    def validate(self) -> None:
        require(bool(self.source), "source", "is required: a sample run folder, a dataset folder or one split")
        require(bool(self.formats), "formats", f"must list at least one of {', '.join(EXPORT_FORMATS)}")
        for name in self.formats:
            require(name in EXPORT_FORMATS, "formats", f"has unknown format {name!r}; use {', '.join(EXPORT_FORMATS)}")
        require(len(set(self.formats)) == len(self.formats), "formats", f"lists a format twice: {self.formats}")
        require(self.min_area >= 0, "min_area", f"must be >= 0 pixels, got {self.min_area}")
        if self.num_classes is not None:
            require(2 <= self.num_classes <= 256, "num_classes", f"must be in 2..256, got {self.num_classes}")
        require(self.max_images >= 0, "max_images", f"must be >= 0 (0 = all), got {self.max_images}")
        require(self.contact_sheet >= 0, "contact_sheet", f"must be >= 0 images (0 = none), got {self.contact_sheet}")


@dataclass
class ImportConfig:
    """`main.py import`: COCO JSON, colour masks or id maps converted into <output_dir>/{train,test}/{images,masks}."""

    format: str = option("", "`coco`, `palette` or `id-map` (required)")
    output_dir: str = option("", "the new (or empty) dataset folder (required)")
    train_images: str = option("", "the folder of training images (required)")
    train_labels: str = option("", "COCO JSON file, or folder of colour masks / id maps (required)")
    test_images: str = option("", "the test split's image folder (with `test_labels`, or neither)")
    test_labels: str = option("", "the test split's labels (with `test_images`, or neither)")
    palette: str = option("", "palette JSON mapping colours to classes (format `palette`)")
    id_mapping: str = option("", "JSON mapping label ids to class ids (format `id-map`)")
    overlap: Literal["smaller-wins", "later-wins"] = option(
        "smaller-wins", "COCO overlaps: `smaller-wins` (objects painted by decreasing area) or `later-wins` (file "
                        "order)")
    ignore_label: Literal[0, 255] = option(0, "what an \"ignore\" id becomes: 0 (background) or 255")
    image_suffix: str = option("", "ending removed from image file names before pairing (Cityscapes: "
                                   "`_leftImg8bit`)")
    label_suffix: str = option("", "ending removed from label file names before pairing (Cityscapes: "
                                   "`_gtFine_labelIds`)")

    def validate(self) -> None:
        require(self.format in IMPORT_FORMATS, "format",
                f"must be one of {', '.join(IMPORT_FORMATS)}, got {self.format!r}")
        require(bool(self.output_dir), "output_dir", "is required: a new or empty folder for the dataset")
        require(bool(self.train_images), "train_images", "is required: the folder of training images")
        labels = {"coco": "the COCO JSON file", "palette": "the folder of colour masks",
                  "id-map": "the folder of id maps"}
        require(bool(self.train_labels), "train_labels", f"is required: {labels[self.format]}")
        missing, given = ("test_labels", "test_images") if self.test_images else ("test_images", "test_labels")
        require(bool(self.test_images) == bool(self.test_labels), missing, f"is required when {given} is given")
        require(self.format != "palette" or bool(self.palette), "palette",
                "is required for format palette: a JSON file mapping colours to classes")
        require(self.format != "id-map" or bool(self.id_mapping), "id_mapping",
                "is required for format id-map: a JSON file mapping label ids to class ids")


CONFIG_CLASSES = {"train": TrainConfig, "finetune": FinetuneConfig, "masks": MaskTrainConfig, "sample": SampleConfig,
                  "export": ExportConfig, "import": ImportConfig}
# ISDM's actions: their config files share one flat key set (ISDM passes the whole file on), so a key of one of
# them is accepted by the others and reported as ignored. export and import have files of their own shape.
ISDM_ACTIONS = ("train", "finetune", "sample")
# other spellings of a key (ISDM's), from the fields' metadata
ALIASES = {f.metadata["alias"]: f.name for cls in CONFIG_CLASSES.values() for f in dataclasses.fields(cls)
           if f.metadata.get("alias")}


def key_names(action: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CONFIG_CLASSES[action])}


def other_actions_with(name: str, action: str) -> list[str]:
    """The ISDM actions other than `action` that take the key `name` (none for export and import)."""
    if action not in ISDM_ACTIONS:
        return []
    return [other for other in ISDM_ACTIONS if other != action and name in key_names(other)]


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as JSON, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def config_from_dict(action: str, values: dict[str, Any], source: str = "config") -> tuple[CommonConfig, list[str]]:
    """Build and validate the action's config; returns it and notes: at most one line, naming the keys that are
    accepted without effect (keys of another ISDM action, ISDM/SDM keys that do nothing here)."""
    names = key_names(action)
    ignored: dict[tuple[str, str], list[str]] = {}  # ("of", owners) or ("why", reason) -> the keys, in file order

    def unknown(key: str, name: str) -> bool:
        name = ALIASES.get(key, name)  # another action's alias (weights_decay in a sample config)
        if name in IGNORED_LEGACY_KEYS:
            ignored.setdefault(("why", IGNORED_LEGACY_KEYS[name]), []).append(key)
            return True
        owners = other_actions_with(name, action)
        if owners:
            ignored.setdefault(("of", "/".join(owners)), []).append(key)
            return True
        elsewhere = [other for other in CONFIG_CLASSES if name in key_names(other)]
        hint = did_you_mean(name, names) or (f" (a key of {'/'.join(elsewhere)})" if elsewhere else "")
        raise ConfigError(f"unknown key '{key}' for {action}{hint}")

    try:
        config = mask_generator_keys(isdm_spellings(read(CONFIG_CLASSES[action], values, unknown=unknown)))
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config, [ignored_note(action, ignored, source)] if ignored else []


def isdm_spellings(config: Any) -> Any:
    """The config with ISDM's keys that stand for another key's value translated (where the file is read, so that
    validate() only checks): `use_fp16` = precision "auto" (bf16 autocast, no fp16 loss scaler, where the device
    runs it natively; not "bf16", so that a CPU that only emulates bf16, 2x slower, stays fp32), and `use_ddim` =
    sampler "ddim" (a sampler other than the default is left to validate() to refuse)."""
    if isinstance(config, CommonConfig) and config.use_fp16 and config.precision == "fp32":
        config = dataclasses.replace(config, precision="auto")
    if isinstance(config, SampleConfig) and config.use_ddim and config.sampler == "ancestral":
        config = dataclasses.replace(config, sampler="ddim")
    return config


def ignored_note(action: str, ignored: dict[tuple[str, str], list[str]], source: str) -> str:
    """One line: 'x.json: ignored for sample: lr, max_steps (keys of train/finetune); results_path (...)'."""
    groups = []
    for (kind, text), keys in ignored.items():
        reason = f"{'key' if len(keys) == 1 else 'keys'} of {text}" if kind == "of" else text
        groups.append(f"{', '.join(keys)} ({reason})")
    return f"{source}: ignored for {action}: {'; '.join(groups)}"


class LoadedConfig(NamedTuple):
    config: CommonConfig
    notes: list[str]  # ignored legacy keys
    given: set[str]  # the keys the file (or --set) gave explicitly, by their canonical names


def load_config(path: str | Path, action: str, overrides: list[str] = ()) -> LoadedConfig:
    """Read a JSON config file for `action`, apply `--set key=value` overrides, and validate it."""
    values = read_config_file(path)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    config, notes = config_from_dict(action, values, str(path))
    names = key_names(action)
    return LoadedConfig(config, notes, {ALIASES.get(k, k) for k in values} & names)


def config_to_dict(config: CommonConfig) -> dict[str, Any]:
    """The config as JSON values (nested objects as dicts): what config.json records and config_from_dict reads."""
    return to_json_dict(config)

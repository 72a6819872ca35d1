"""The mask generator: a small diffusion model over label maps, so synthetic images can get new layouts.

Until now every synthetic image was drawn for a mask that already exists. This module trains a diffusion model on
the dataset's own masks (`main.py masks`, run folders `masks_NNN/`) and samples new ones, optionally asked to
contain given classes (e.g. a rare defect).

Design choices, and why
- Representation: one-hot scaled to [-1, 1] (K channels for K classes, 2 * one_hot - 1), decoded by argmax, so
  decode(encode(m)) == m exactly. Analog bits (ceil(log2 K) channels) save channels only when K is large, and
  leave 2^b - K codes that decode to no class; defect datasets have 2 to ~10 classes, where one-hot costs the
  UNet nothing but a wider first and last convolution.
- Network: our `SDMUNet`, unchanged (no edit to unet.py; the checkpoint is a plain SDMUNet state dict). Its
  "image" channels are the K one-hot channels (`image_channels` = num_classes). Its SPADE input, the per-pixel
  label map in the SDM, carries the *presence vector* instead, as a 1x1 map: SPADE resizes it to every decoder
  resolution, so each decoder normalisation gets a per-channel scale and shift predicted from the presence
  vector (a FiLM conditioning). SPADE cannot be switched off without editing unet.py, and using it for the
  condition costs no new layer. Adding the condition to the timestep embedding would need a new layer inside
  `SDMUNet.forward`.
- Presence condition: the multi-hot vector of the classes a mask holds (exactly that set). It is taken from the
  training batch's label map (its maximum over the pixels), after flips and crops, so the SDM's `Trainer` runs
  unchanged: its null-label dropout (`drop_rate`, set from `presence_drop`) zeroes the map, and the all-zero
  vector is the null condition, as the all-zero label map is the SDM's; `guidance.conditional_denoiser` gives
  classifier-free guidance as it is. To ask for "masks containing class c", whole presence vectors are drawn
  from the training masks' vectors that contain c (the table of them is stored in the checkpoint), so the
  classes that come with c come at their real rates; an explicit vector can be given instead.
- Process and training: diffusion.py's GaussianDiffusion (hybrid loss, learned variance), with the cosine
  schedule by default (improved DDPM found it better than linear at 32-64 px); train.py's `Trainer` (run folder,
  EMA, best epoch, exact resume, progress bar, signals) with a dataset whose "image" is the encoded mask
  (train.py). Measured: the default model trains at ~19 masks/s at 32 px on one CPU thread; 64 px costs
  about four times that.
- Parametrisation and loss (defaults since 2026-12-03): the network predicts v (`prediction`), whose x0 estimate
  stays well conditioned at the top noise levels where masks take shape, and each pixel's error is weighted by
  its class's rarity (`class_weight_power` 0.25), so the small classes are learned. On magnetic-tile (64 px,
  1,200 steps) this brought the pixel shares, the share of masks holding each class and the share of
  background-only masks to what a held-out set of real masks gives; eps with the plain loss, the earlier
  default, left masks too empty and fragmented (docs/mask_generator.md). Checkpoints without these keys are
  read with the values they trained with (`LEGACY_KEYS`).
- The top sampling step takes the training masks' mean mask (for the presence vector) as its prediction of x0
  (`first_step`): at alpha_bar ~ 1e-9 an eps model's x0 is noise, and for masks that noise picks the dominant
  class of the whole mask, which later steps keep (on a toy generator: background 37% of the pixels instead of
  the real 96%; with the mean-mask step 95%).
- Size: the generator works at its own `image_size`; `upsample_mask` brings masks to the SDM's size by nearest
  neighbour then a majority filter about one upsampling factor wide, so edges do not come out as staircases;
  `remove_small_components` optionally drops components below `min_area` pixels (filled with the class around
  them).
- Sample runs (key `mask_source`): `generate_for_sampling` makes the masks of a run, with `balance_args` chosen
  by balance.py among generated candidates of which a share was asked to hold each class, and the quality report
  of report.py. Inpaint paints a mask's defect pixels only and skips masks of background alone, so in mode
  `inpaint` the presence vectors are drawn among those that hold a class other than 0, and a mask that still
  comes out without one is redrawn (`_redraw_defect_free`): num_samples masks give num_samples images. (Before,
  on magnetic-tile, 28 of 100 generated masks held no defect and gave no image.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..balance import ChosenMask, balance, count_all, format_table, load_masks, make_report
from ..config import BalanceArgs, MaskTrainConfig, SampleConfig, config_from_dict
from ..data import Pair, one_hot
from ..diffusion import GaussianDiffusion
from ..errors import CheckpointError, ConfigError
from ..guidance import conditional_denoiser
from ..samplers import SAMPLERS, PerImageNoise, run_sampler
from ..unet import SDMUNet
from .report import mask_report, novelty_summary, remove_small_components

ACTION = "masks"
"""`main.py masks` trains a mask generator; its run folders are `masks_NNN/` (never mixed with the SDM's train
runs, so auto_resume and resume_checkpoint cannot pick an SDM checkpoint for a mask model or the reverse)."""
FORMAT = "sdm-mask-generator-v1"
LEGACY_KEYS = {"prediction": "eps", "class_weight_power": 0.0, "crop_size": 0}
"""Keys added to the generator after the first checkpoints, with the value those were trained with: a checkpoint
config that lacks one is read with this value, not today's default (which for `prediction` and
`class_weight_power` is no longer what they trained with)."""


def with_legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A generator checkpoint's (or run's) config dict, with the keys it predates set to what it trained with."""
    return {**LEGACY_KEYS, **config}


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def encode(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 N×H×W class ids -> float32 N×K×H×W one-hot scaled to [-1, 1] (the generator's "image")."""
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_classes):
        raise ValueError(f"encode: class ids {int(mask.min())}..{int(mask.max())} outside 0..{num_classes - 1}")
    return one_hot(mask, num_classes).mul_(2.0).sub_(1.0)


def decode(x: torch.Tensor) -> torch.Tensor:
    """N×K×H×W scores (an encoded mask, or the generator's output) -> int64 N×H×W class ids, by argmax."""
    if x.dim() != 4:
        raise ValueError(f"decode expects N×K×H×W scores, got shape {tuple(x.shape)}")
    return x.argmax(dim=1)


def presence(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float32 N×K multi-hot vector of the classes each mask of an int64 N×H×W batch holds."""
    return presence_of_labels(one_hot(mask, num_classes))


def presence_of_labels(labels: torch.Tensor) -> torch.Tensor:
    """The presence vectors N×K of a label map N×K×H×W (a one-hot map, all zero for a dropped label): its maximum
    over the pixels, so an all-zero map gives the null (all-zero) vector."""
    return labels.flatten(2).amax(dim=2)


def presence_map(vectors: torch.Tensor) -> torch.Tensor:
    """N×K presence vectors as the N×K×1×1 map the UNet's SPADE layers take (they resize it to each level)."""
    return vectors[:, :, None, None]


class PresenceConditioned:
    """Calls the network with the presence map of the label map it is given, so the SDM's training step (which
    passes the one-hot mask, zeroed when dropped) conditions the mask generator on presence."""

    def __init__(self, network: Callable[..., torch.Tensor]):
        self.network = network

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.network(x, timesteps, presence_map(presence_of_labels(labels)))


# ---------------------------------------------------------------------------------------------------------------
# Data


class EncodedMaskDataset(torch.utils.data.Dataset):
    """Masks as the Trainer's items: {"image": the encoded mask K×S×S in [-1, 1], "mask": int64 S×S, "index"}.

    The masks are loaded once, at construction (a few hundred small masks)."""

    def __init__(self, masks: Sequence[np.ndarray], num_classes: int):
        self.masks = [np.ascontiguousarray(m) for m in masks]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict:
        mask = torch.from_numpy(self.masks[index].astype(np.int64))
        return {"image": encode(mask[None], self.num_classes)[0], "mask": mask, "index": index}


@dataclass(frozen=True)
class PresenceTable:
    """The distinct presence vectors of the training masks, how many masks have each, and their mean class pixel
    shares (stored in checkpoints)."""

    vectors: np.ndarray  # int64 V×K of 0/1
    counts: np.ndarray  # int64 V
    pixel_shares: np.ndarray  # float64 V×K: the mean pixel share of each class over the masks with that vector

    @classmethod
    def of_masks(cls, masks: Sequence[np.ndarray], num_classes: int) -> PresenceTable:
        shares = np.zeros((len(masks), num_classes))
        for i, mask in enumerate(masks):
            mask = np.asarray(mask)
            shares[i] = np.bincount(mask.ravel().astype(np.int64), minlength=num_classes)[:num_classes] / mask.size
        rows = (shares > 0).astype(np.int64)
        if not len(rows):
            return cls(np.zeros((0, num_classes), np.int64), np.zeros(0, np.int64), np.zeros((0, num_classes)))
        vectors, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
        means = np.stack([shares[inverse.ravel() == v].mean(0) for v in range(len(vectors))])
        return cls(vectors.astype(np.int64), counts.astype(np.int64), means)

    def to_dict(self) -> dict[str, Any]:
        return {"vectors": self.vectors.tolist(), "counts": self.counts.tolist(),
                "pixel_shares": self.pixel_shares.round(6).tolist()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], num_classes: int) -> PresenceTable:
        vectors = np.asarray(values["vectors"], np.int64).reshape(-1, num_classes)
        return cls(vectors, np.asarray(values["counts"], np.int64),
                   np.asarray(values["pixel_shares"], np.float64).reshape(-1, num_classes))

    def mean_mask(self, presence: np.ndarray) -> np.ndarray:
        """The encoded mean mask (2 x mean pixel share - 1 per class, float32 K) of the training masks with this
        presence vector; of all training masks for the null vector or a vector none of them has."""
        same = (self.vectors == np.asarray(presence, np.int64)[None]).all(axis=1)
        if presence.any() and same.any():
            shares = self.pixel_shares[same][0]
        else:
            shares = self.class_pixel_shares()
        return (2.0 * shares - 1.0).astype(np.float32)

    def class_pixel_shares(self) -> np.ndarray:
        """Each class's share of all the training masks' pixels (float64 K; the masks are all one size)."""
        return (self.pixel_shares * self.counts[:, None]).sum(0) / max(int(self.counts.sum()), 1)

    def class_rates(self) -> np.ndarray:
        """Share of the training masks that hold each class."""
        total = max(int(self.counts.sum()), 1)
        return (self.vectors * self.counts[:, None]).sum(0) / total

    def draw(self, required: Sequence[int], rng: np.random.Generator, with_defect: bool = False) -> np.ndarray:
        """One presence vector among the training masks' vectors that hold every class of `required` (and with
        `with_defect` some class other than 0, the background inpaint paints into), drawn in proportion to how
        many masks have it; ConfigError when no training mask holds them all."""
        keep = self.vectors[:, list(required)].all(axis=1) if len(required) else np.ones(len(self.vectors), bool)
        if not keep.any():
            raise ConfigError(f"no training mask of the generator holds classes {sorted(set(required))} together; "
                              "ask for classes that appear (together) in its train/ masks")
        if with_defect:
            keep &= self.vectors[:, 1:].any(axis=1)
            if not keep.any():
                raise ConfigError("mode 'inpaint' paints defects (classes other than 0), but no training mask of "
                                  "the mask generator (mask_source) holds one" +
                                  (f" together with classes {sorted(set(required))}" if len(required) else ""))
        weights = self.counts[keep] / self.counts[keep].sum()
        return self.vectors[keep][rng.choice(int(keep.sum()), p=weights)]


# ---------------------------------------------------------------------------------------------------------------
# Loading and sampling


@dataclass
class MaskGenerator:
    """A trained mask generator, ready to sample: its config, the (EMA) network and the presence table."""

    config: MaskTrainConfig
    model: SDMUNet
    presence_table: PresenceTable
    class_names: list[str]
    checkpoint_path: Path

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


def load_mask_generator(path: str | Path, device: torch.device | str = "cpu", key: str = "mask_source",
                        use_ema: bool = True) -> MaskGenerator:
    """The mask generator of a checkpoint file or `masks_NNN` run folder (its best.pt, else latest.pt); `key` is
    the config key that named it, for the error lines."""
    path = ckpt.resolve_checkpoint(path, key=key, prefer="best", actions=(ACTION,))
    payload = ckpt.load_checkpoint(path)
    info = payload.get("mask_generator")
    if not isinstance(info, dict) or info.get("format") != FORMAT or not payload.get("config"):
        raise CheckpointError(f"{key} {str(path)!r}: not a mask generator checkpoint (train one with "
                              f"`main.py masks`; an SDM image model cannot make masks)")
    config, _ = config_from_dict(ACTION, with_legacy_keys(payload["config"]), f"checkpoint {path}")
    model = SDMUNet(config.unet_spec())
    ckpt.load_weights(model, ckpt.extract_state_dict(payload, prefer_ema=use_ema), path, "the mask generator")
    table = PresenceTable.from_dict(info["presence"], config.num_classes)
    names = list(info.get("class_names") or [f"class_{i}" for i in range(config.num_classes)])
    return MaskGenerator(config, model.to(device).eval(), table, names, path)


def check_num_classes(generator: MaskGenerator, num_classes: int, model_source: str = "the image model") -> None:
    """ConfigError unless the generator makes masks of the image model's `num_classes` classes."""
    if generator.num_classes != num_classes:
        raise ConfigError(f"mask_source {str(generator.checkpoint_path)!r} makes masks of {generator.num_classes} "
                          f"classes but {model_source} has {num_classes}; train the mask generator on the same "
                          f"dataset and num_classes")


def check_classes(classes: Sequence[int], num_classes: int, key: str = "mask_classes") -> list[int]:
    """The class ids asked for, checked against num_classes (ConfigError naming `key`)."""
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < num_classes:
            raise ConfigError(f"key '{key}' holds {c!r}, not a class id in 0..{num_classes - 1}")
    return sorted({int(c) for c in classes})


def sampling_diffusion(config: MaskTrainConfig, steps: int) -> GaussianDiffusion:
    """The generator's process respaced to `steps` steps (one model evaluation each)."""
    if not 2 <= steps <= config.diffusion_steps:
        raise ConfigError(f"mask sampling steps must be in 2..{config.diffusion_steps}, got {steps}")
    return GaussianDiffusion.create(config.diffusion_steps, config.noise_schedule, steps,
                                    learn_sigma=config.learn_sigma, rescale_timesteps=config.rescale_timesteps,
                                    prediction=config.prediction)


MASK_STREAM = 16
"""Tags the random streams of generated masks, so that mask i's noise is not image i's (samplers.image_seed)."""


def mask_seed(seed: int, index: int, attempt: int = 0) -> int:
    """The seed of generated mask `index` of a run seeded with `seed` (independent of the images' seeds); draw
    `attempt` > 0 of the same mask (`mask_retries`) gets a seed of its own."""
    entropy = [seed, index, MASK_STREAM] + ([attempt] if attempt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def presence_misses(masks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per mask, how many classes differ between what it holds and its presence vector (classes asked for and
    missing, plus classes held and not asked for); 0 for the null (all-zero) vector, which asks for nothing."""
    held = presence(torch.from_numpy(np.asarray(masks, np.int64)), rows.shape[1]).numpy() > 0
    wanted = np.asarray(rows) > 0
    return np.where(wanted.any(axis=1), (held != wanted).sum(axis=1), 0)


def presence_vectors(generator: MaskGenerator, count: int, seed: int, required_classes: Sequence[int] = (),
                     first_index: int = 0, with_defect: bool = False) -> np.ndarray:
    """The presence vector of masks first_index .. first_index + count - 1: each drawn (with its own seed) from
    the training masks' vectors that hold every class of `required_classes` (and some class other than 0 with
    `with_defect`)."""
    required = check_classes(required_classes, generator.num_classes)
    rows = [generator.presence_table.draw(required, np.random.default_rng(mask_seed(seed, first_index + i)),
                                          with_defect) for i in range(count)]
    return np.stack(rows).astype(np.int64)


def first_step(diffusion: GaussianDiffusion, noise: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """x after the top step, taken (as DDIM's deterministic step) with the training masks' mean mask as the
    prediction of x0: sqrt(a') m + sqrt(1 - a') eps, eps = (x_T - sqrt(a_T) m) / sqrt(1 - a_T), a = alpha_bar.

    At the top step alpha_bar is about 1e-9 (cosine) to 4e-5 (linear): x_T holds no trace of the mask, so the
    best prediction of x0 is the mean mask, while an eps model's prediction, divided by sqrt(alpha_bar) to give
    x0, is noise. Measured on a toy generator: the model's first-step x0 set a wrong dominant class for whole
    masks (background 37% of the pixels instead of 96%), which the later steps kept. `means` is N×K (one value
    per class channel), broadcast over the pixels."""
    top, below = diffusion.num_timesteps - 1, diffusion.num_timesteps - 2
    a_top, a_below = float(diffusion.alphas_cumprod[top]), float(diffusion.alphas_cumprod[below])
    mean = means[:, :, None, None].to(noise.dtype)
    eps = (noise - math.sqrt(a_top) * mean) / math.sqrt(1.0 - a_top)
    return math.sqrt(a_below) * mean + math.sqrt(1.0 - a_below) * eps


@torch.no_grad()
def sample_masks(generator: MaskGenerator, num_samples: int, *, seed: int = 0, required_classes: Sequence[int] = (),
                 presence_rows: np.ndarray | None = None, guidance_scale: float = 1.0, steps: int = 25,
                 sampler: str = "ancestral", image_size: int | None = None, min_area: int = 0, batch_size: int = 16,
                 first_index: int = 0, with_defect: bool = False, retries: int = 0,
                 progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None) -> np.ndarray:
    """num_samples new masks, int64 N×S×S class ids (S = image_size, default the generator's own size).

    Each mask is conditioned on a presence vector: the rows of `presence_rows` (N×K of 0/1; all zero = no
    condition) when given, else vectors drawn from the training masks' vectors holding `required_classes` (all
    of them when empty; with `with_defect`, vectors that hold some class other than 0). The top step takes the
    training masks' mean mask (for that vector) as x0 (`first_step`);
    `guidance_scale` > 1 applies classifier-free guidance toward the condition in the others. The default
    sampler is ancestral: on magnetic-tile (64 px, 6 classes, 700 steps) DDIM and DPM-Solver++ at 25 steps left
    speckle noise of every class in every mask (background 75-78 % of the pixels, real 94 %), ancestral 97 %,
    still with speckles (92 % of its components under 4 px, real 9 %: `min_area` removes them); at 50 ancestral
    steps 5 of 16 masks came out mostly defect. Probes placed the speckles at the top noise levels: started from
    the mean mask at alpha_bar 0.07, masks were clean but nearly empty (99.9 % background).
    Mask i gets the noise and presence of `mask_seed(seed, first_index + i)`, whatever the batch size. Masks made
    at another size are brought to image_size by `upsample_mask` (nearest + majority filter); `min_area` > 0 then
    removes components of fewer pixels (`remove_small_components`).

    `retries` > 0 (key `mask_retries`): a finished mask (upsampled and cleaned) whose classes differ from its
    presence vector is drawn again with the same vector and new noise (`mask_seed`'s `attempt`), up to `retries`
    more times, and the draw with the fewest differing classes is kept (the first of equals). A real mask holds
    exactly the classes of its vector, so this keeps only draws the true conditional distribution could give;
    it corrects the generator's masks that come out emptier than asked. `log` gets one line of what was redrawn."""
    config, model = generator.config, generator.model
    k = config.num_classes
    if sampler not in SAMPLERS:
        raise ConfigError(f"mask sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if guidance_scale < 1.0:
        raise ConfigError(f"mask guidance scale must be >= 1 (1 = none), got {guidance_scale}")
    if presence_rows is None:
        presence_rows = presence_vectors(generator, num_samples, seed, required_classes, first_index, with_defect)
    presence_rows = np.asarray(presence_rows, np.float32)
    if presence_rows.shape != (num_samples, k):
        raise ValueError(f"presence_rows must be {num_samples}x{k}, got {presence_rows.shape}")
    if retries < 0:
        raise ConfigError(f"mask_retries must be >= 0 (0 = off), got {retries}")
    diffusion = sampling_diffusion(config, steps)
    device = next(model.parameters()).device
    size = config.image_size
    target = image_size or size

    def draw(indices: Sequence[int], attempt: int) -> np.ndarray:
        """Masks `indices` (of this call), finished at `target` px, from draw `attempt` of their noise."""
        out = []
        for start in range(0, len(indices), batch_size):
            ids = indices[start:start + batch_size]
            noise = PerImageNoise([mask_seed(seed, first_index + i, attempt) for i in ids], (k, size, size), device)
            rows = presence_rows[list(ids)]
            labels = presence_map(torch.from_numpy(rows).to(device))
            means = torch.from_numpy(np.stack([generator.presence_table.mean_mask(row) for row in rows])).to(device)
            denoise = conditional_denoiser(model, labels, guidance_scale)
            x = run_sampler(sampler, diffusion, denoise, first_step(diffusion, noise(), means), noise,
                            progress=progress, start_step=diffusion.num_timesteps - 2)
            out.append(decode(x.float()).cpu())
        masks = torch.cat(out).numpy()
        if target != size:
            masks = upsample_mask(masks, target, k)
        if min_area > 0:
            masks = np.stack([remove_small_components(m, min_area) for m in masks])
        return masks.astype(np.int64)

    masks = draw(range(num_samples), 0)
    if retries:
        misses = presence_misses(masks, presence_rows)
        differed, redrawn = int((misses > 0).sum()), 0
        for attempt in range(1, retries + 1):
            redo = np.flatnonzero(misses > 0)
            if not len(redo):
                break
            fresh = draw(redo.tolist(), attempt)
            fresh_misses = presence_misses(fresh, presence_rows[redo])
            better = fresh_misses < misses[redo]
            masks[redo[better]], misses[redo[better]] = fresh[better], fresh_misses[better]
            redrawn += len(redo)
        if log is not None and differed:
            log(f"generated masks: {differed} of {num_samples} held other classes than their presence vector; "
                f"{redrawn} redrawn (mask_retries {retries}), {int((misses > 0).sum())} still differ")
    return masks


# ---------------------------------------------------------------------------------------------------------------
# Post-processing


def majority_window(factor: float) -> int:
    """The side of the majority filter after upsampling by `factor`: the odd number nearest factor + 1 (1 = none
    for factors below 1.5)."""
    if factor < 1.5:
        return 1
    side = int(round(factor)) + 1
    return side if side % 2 else side + 1


def upsample_mask(masks: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """H×W or N×H×W class ids -> size×size: nearest neighbour (pixel centres), then a majority filter about one
    upsampling factor wide (the window's most common class; a tie keeps the pixel's class), which rounds the
    staircase edges nearest neighbour leaves. Same size: returned unchanged. Down-sizing: nearest only."""
    masks = np.asarray(masks)
    single = masks.ndim == 2
    batch = torch.from_numpy(masks[None] if single else masks).long()
    if batch.shape[-2:] == (size, size):
        return masks.copy()
    labels = one_hot(batch, num_classes)
    labels = F.interpolate(labels, size=(size, size), mode="nearest-exact")
    window = majority_window(size / max(batch.shape[-2:]))
    if window > 1:
        votes = F.avg_pool2d(labels, window, stride=1, padding=window // 2, count_include_pad=False)
        labels = votes + 1e-3 * labels  # a tie keeps the pixel's own class
    result = labels.argmax(1).numpy().astype(masks.dtype if np.issubdtype(masks.dtype, np.integer) else np.int64)
    return result[0] if single else result


# ---------------------------------------------------------------------------------------------------------------
# The masks of a sample run (key mask_source)

POOL_FACTOR = 2
"""With balance_args, the generator makes this many candidate masks per image, and balance.py chooses among them."""
REPORT_MIN_AREA = 4
"""The speckle size of masks_report.md when mask_min_area is 0 (off)."""


@dataclass
class GeneratedMasks:
    """The generated masks of a sample run, and the reports written with them."""

    sources: list[ChosenMask]  # one per image; stem "genNNNNN" (balance_args augmentation: "augNNNN-<kind>_genNNNNN")
    selection_report: dict[str, Any] | None  # balance.json's content, with balance_args
    quality_report: dict[str, Any]  # masks_report.json's content (report.py)
    checkpoint_path: Path


def generate_for_sampling(config: SampleConfig, real_pairs: Sequence[Pair], device: torch.device | str,
                          class_names: Sequence[str], log=print) -> GeneratedMasks:
    """The masks of a sample run with `mask_source`: num_samples new masks from the generator at the sample
    run's image_size, each holding `mask_classes`; with `balance_args`, chosen by balance.py among POOL_FACTOR x
    num_samples generated candidates of which a share was asked to hold each participating class (rare classes
    thus get candidates that hold them). The quality report compares them with the real train/ masks
    (`real_pairs`) at the same size."""
    generator = load_mask_generator(config.mask_source, device)
    check_num_classes(generator, config.num_classes, "the image model (model_path)")
    num_classes = config.num_classes
    required = check_classes(config.mask_classes, num_classes)
    if required and not generator.presence_table.vectors[:, required].all(axis=1).any():
        raise ConfigError(f"key 'mask_classes' is {required} but no training mask of the mask generator holds "
                          f"{'them together' if len(required) > 1 else 'it'}; ask for classes its train/ masks hold")
    options = {"guidance_scale": config.mask_guidance, "steps": config.mask_steps, "image_size": config.image_size,
               "min_area": config.mask_min_area, "batch_size": config.batch_size,
               "with_defect": config.mode == "inpaint", "retries": config.mask_retries, "log": log}
    real = load_masks(real_pairs, config.image_size, config.dataset_mode, config.resize_mode)
    log(f"generating masks with {generator.checkpoint_path} ({generator.config.image_size} px, {config.mask_steps} "
        f"steps, guidance {config.mask_guidance:g}" + (f", holding classes {required}" if required else "") + ")")
    if config.balance_args is None:
        masks = sample_masks(generator, config.num_samples, seed=config.seed, required_classes=required, **options)
        indices = list(range(config.num_samples))
        if options["with_defect"]:
            indices, masks = _redraw_defect_free(generator, indices, masks, config.seed, required, options, log)
        sources, selection = [ChosenMask(f"gen{i:05d}", None, mask) for i, mask in zip(indices, masks)], None
    else:
        sources, selection = _balanced(generator, config, config.balance_args, real, required, class_names,
                                       options, log)
    quality = mask_report([source.mask for source in sources], real, num_classes, class_names=class_names,
                          min_area=config.mask_min_area or REPORT_MIN_AREA, clean_real_below=config.mask_min_area)
    log(f"generated masks: {novelty_summary(quality['novelty'], len(sources))}; speckles "
        f"{100 * quality['validity']['speckle_share_generated']:.1f}% (masks_report.md)")
    return GeneratedMasks(sources, selection, quality, generator.checkpoint_path)


REDRAW_ROUNDS = 3
"""Inpaint with generated masks: a mask that holds no defect pixel (its vector held one, but sampling or
min_area left none) is redrawn at most this many times, at fresh mask indices."""


def _redraw_defect_free(generator: MaskGenerator, indices: list[int], masks: np.ndarray, seed: int,
                        required: list[int], options: dict[str, Any], log) -> tuple[list[int], np.ndarray]:
    """Inpaint paints only the defect pixels of a mask (classes other than 0) and skips masks of background alone,
    so each such generated mask is replaced by a new one (mask indices after the last used), up to
    REDRAW_ROUNDS rounds; the masks still without a defect are kept, and inpaint skips and counts them."""
    indices, masks, redrawn = list(indices), np.array(masks), 0
    next_index = max(indices, default=-1) + 1
    for _ in range(REDRAW_ROUNDS):
        empty = [j for j, mask in enumerate(masks) if not mask.any()]
        if not empty:
            break
        fresh = sample_masks(generator, len(empty), seed=seed, required_classes=required, first_index=next_index,
                             **options)
        for j, mask in zip(empty, fresh):
            indices[j], masks[j] = next_index, mask
            next_index += 1
        redrawn += len(empty)
    if redrawn:
        left = sum(not mask.any() for mask in masks)
        log(f"inpaint: redrew {redrawn} generated masks that held no defect pixel" +
            (f"; {left} still hold none and are skipped" if left else ""))
    return indices, masks


def _balanced(generator: MaskGenerator, config: SampleConfig, args: BalanceArgs, real: Sequence[np.ndarray],
              required: list[int], names: Sequence[str], options: dict[str, Any],
              log) -> tuple[list[ChosenMask], dict[str, Any]]:
    """balance_args over a pool of generated candidates: one group asked for `required` alone, one more per
    participating class that some training mask holds with them (asked for it too), equal in size."""
    num_classes, num_samples = config.num_classes, config.num_samples
    table = generator.presence_table
    groups = [required]
    for class_id in args.participating(num_classes):
        wanted = sorted(set(required) | {class_id})
        if wanted != required and table.vectors[:, wanted].all(axis=1).any():
            groups.append(wanted)
    per_group = -(-POOL_FACTOR * num_samples // len(groups))
    pool: list[np.ndarray] = []
    for g, group in enumerate(groups):
        pool += list(sample_masks(generator, per_group, seed=config.seed, required_classes=group,
                                  first_index=g * per_group, **options))
    real_counts = count_all(real, num_classes, args.based_on_pixel_count).sum(0)
    result = balance(pool, real_counts, num_samples, num_classes, args, config.seed, names)
    sources, listed, numbers = [], [], {}
    for choice, mask in zip(result.choices, result.masks):
        stem = f"gen{choice.source:05d}"
        if choice.augmentation is not None:
            number = numbers.setdefault(choice.augmentation, len(numbers))
            stem = f"aug{number:04d}-{choice.augmentation.kind}_{stem}"
        sources.append(ChosenMask(stem, None, mask))
        listed.append({"stem": stem, "asked_classes": groups[min(choice.source // per_group, len(groups) - 1)],
                       "augmentation": None if choice.augmentation is None else choice.augmentation.kind})
    report = make_report(result, args, names, num_samples)
    report.update({"image_size": config.image_size, "mask_source": str(generator.checkpoint_path),
                   "candidates": len(pool), "candidate_groups": {", ".join(map(str, g)) or "none": per_group
                                                                 for g in groups},
                   "real_masks": len(real), "masks": listed})
    for line in result.notes + format_table(report):
        log(line)
    if result.warning:
        log(f"warning: {result.warning}")
    return sources, report

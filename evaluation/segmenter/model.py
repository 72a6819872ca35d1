"""Segmenters from segmentation_models_pytorch: build, train on in-memory (image, mask) arrays, predict.

Training is a fixed number of optimizer steps, not epochs, so that every mix of an experiment gets the same
budget: with epochs, a mix of 100 real + 300 synthetic images would get four times the updates of 100 real
images alone, and a gain could come from the extra updates rather than from the synthetic data. Batches are
drawn from successive seeded permutations of the training set (every image once per pass).

Determinism: the weights' initialisation, dropout, batch order and flips all come from `TrainSettings.seed`.
For a seed, every mix starts from the same initial weights, so mixes are compared in pairs. On CPU a run is
repeatable bit for bit; on CUDA some kernels are not deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from guided_diffusion.checkpoint import read_weights_file
from guided_diffusion.errors import CheckpointError, ConfigError

from .pretrained import IMAGENET, install_hint, packaged_encoder_state
from .settings import canonical_architecture


def smp_class(architecture: str) -> type[nn.Module]:
    """The smp class behind an architecture name of settings.ARCHITECTURE_NAMES. smp is imported here, when a
    segmenter is built, not with this module: it pulls in timm and torchvision (4 s), which a study unit that
    only samples or trains an SDM never uses."""
    import segmentation_models_pytorch as smp

    return {"unetplusplus": smp.UnetPlusPlus, "fpn": smp.FPN, "deeplabv3plus": smp.DeepLabV3Plus,
            "unet": smp.Unet}[architecture]


# ImageNet statistics: what smp encoders expect when they start from pretrained weights; harmless from scratch
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegmenterSpec:
    """What to build: architecture, encoder and number of classes; `encoder_weights` is None (random init),
    "imagenet" (from an installed package that ships them, else smp's download) or a local file."""

    architecture: str
    num_classes: int
    encoder: str = "resnet18"
    encoder_weights: str | None = None


AUGMENTATIONS = ("none", "flip", "strong")
"""Online augmentation of the training batches: none; random horizontal and vertical flips; or `strong`, the
classic augmentation a reviewer asks for: flips and 90-degree turns, a random zoom into a crop (scale 1 to 1.5),
and brightness / contrast jitter (each +-20 %)."""


@dataclass(frozen=True)
class TrainSettings:
    """How to train: optimizer steps, batch size, AdamW with cosine decay, augmentation, seed, the ignored label,
    bf16 autocast, and model selection on a validation set every `select_every` steps (0 = keep the last)."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool | str = True  # True = "flip", False = "none"
    seed: int = 0
    ignore_index: int | None = None
    bf16: bool = False
    select_every: int = 0
    # how synthetic items enter training (train_segmenter's `synthetic` marks them); the defaults pool them with
    # the real items, as before the keys existed
    synthetic_ratio: float | None = None  # share of each batch drawn from synthetic items; None = pooled
    synthetic_weight: float = 1.0  # weight of a synthetic item's loss against a real one's
    real_finetune_share: float = 0.0  # share of the steps, at the end, on real items only (SegGen's two stages)

    @property
    def mixes(self) -> bool:
        """Whether any of the synthetic-data keys is off its default (training then tells the items apart)."""
        return (self.synthetic_ratio is not None or self.synthetic_weight != 1.0
                or self.real_finetune_share > 0.0)

    @property
    def augmentation(self) -> str:
        if isinstance(self.augment, bool):
            return "flip" if self.augment else "none"
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        return self.augment


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a weights file: a plain state dict, or a dict holding one under 'state_dict' or 'model'."""
    path = Path(path)
    payload = read_weights_file(path, CheckpointError, f"encoder_weights {path}: file not found",
                                f"encoder_weights {path}: cannot be read as PyTorch weights", ("state_dict", "model"))
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"encoder_weights {path}: not a state dict of tensors")
    return payload


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local encoder state dict (torchvision/timm naming as smp's encoder has it) into `model.encoder`."""
    state = _read_state_dict(path)
    own = model.encoder.state_dict()
    if not any(key in own for key in state) and any(f"model.{key}" in own for key in state):
        state = {f"model.{key}": value for key, value in state.items()}  # timm weights for a 'tu-' encoder
    # the classifier head of an ImageNet checkpoint has no place in an encoder
    heads = ("fc", "classifier", "head")
    state = {key: value for key, value in state.items() if key in own or key.split(".")[0] not in heads}
    fit_encoder(model, state, str(path))


def fit_encoder(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model.encoder`, every tensor of it: a CheckpointError naming `source` when a key is
    missing, unexpected or of another shape."""
    encoder = model.encoder
    own = encoder.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [key for key in own if key in state and tuple(state[key].shape) != tuple(own[key].shape)]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise CheckpointError(f"encoder_weights {source}: does not fit encoder {type(encoder).__name__}: "
                              + ", ".join(parts))
    encoder.load_state_dict(state)


def _smp_model(architecture: str, spec: SegmenterSpec, seed: int, weights: str | bool | None) -> nn.Module:
    """smp's model, its random init drawn from `seed` (the caller's random state left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return smp_class(architecture)(encoder_name=spec.encoder, encoder_weights=weights, in_channels=3,
                                       classes=spec.num_classes)


def _downloaded(architecture: str, spec: SegmenterSpec, seed: int) -> nn.Module:
    """The model with smp's own download of the encoder's ImageNet weights (timm's for a 'tu-' encoder); the
    decoder's init is the random model's of the same seed. One CheckpointError line when the download fails."""
    try:
        return _smp_model(architecture, spec, seed, True if spec.encoder.startswith("tu-") else IMAGENET)
    except OSError as error:  # no network (huggingface_hub, urllib and requests errors are OSErrors)
        raise CheckpointError(
            f"encoder_weights \"{IMAGENET}\": cannot download the ImageNet weights of encoder {spec.encoder} "
            f"({type(error).__name__}; no network?); offline, {install_hint(spec.encoder)}, or give a local "
            "weights file") from None
    except (KeyError, ValueError, RuntimeError) as error:  # smp / timm hold no ImageNet weights for it
        text = str(error).strip("'\"").splitlines()[0][:160]
        raise ConfigError(f"key 'encoder_weights': encoder {spec.encoder} has no ImageNet weights in smp or timm "
                          f"({text}); give a local weights file or null") from None


def build_segmenter(spec: SegmenterSpec, seed: int = 0) -> nn.Module:
    """A fresh smp model; random init from `seed`, then the encoder's weights when `spec.encoder_weights` names
    them: "imagenet" (from an installed package that ships them, no network; else smp's download) or a file."""
    architecture = canonical_architecture(spec.architecture)
    try:
        model = _smp_model(architecture, spec, seed, None)
    except (KeyError, ValueError) as error:
        text = str(error).strip("'\"").splitlines()[0][:160]
        raise ConfigError(f"key 'encoder': {spec.encoder!r} cannot be used with {architecture} ({text})") from None
    if spec.encoder_weights == IMAGENET:
        packaged = packaged_encoder_state(spec.encoder)
        if packaged is None:
            return _downloaded(architecture, spec, seed)
        state, path = packaged
        fit_encoder(model, state, str(path))
    elif spec.encoder_weights:
        load_encoder_weights(model, spec.encoder_weights)
    return model


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) images to the float (N, 3, H, W) input the encoders expect (ImageNet normalised)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _stack(images: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Check that images are uint8 (N, H, W, 3) and masks (N, H, W) of one size, and return them as arrays."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images for {len(masks)} masks")
    if len(images) == 0:
        raise ValueError("no training images")
    images = images if isinstance(images, np.ndarray) else np.stack(list(images))
    masks = masks if isinstance(masks, np.ndarray) else np.stack(list(masks))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be (N, H, W) = {images.shape[:3]}, got {masks.shape}")
    return images, masks


def batch_order(num_items: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Indices of each step's batch: successive seeded permutations, cut into batches across pass boundaries,
    so every batch is full even when the set is smaller than a batch."""
    rng = np.random.default_rng(seed)
    pending = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(num_items)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def mixed_batch_order(synthetic: np.ndarray, batch_size: int, steps: int, seed: int, ratio: float | None,
                      real_steps: int) -> Iterator[np.ndarray]:
    """Indices of each step's batch when synthetic items are told apart (`synthetic`, bool per item): with
    `ratio`, round(ratio x batch) items of each batch from the synthetic items and the rest from the real ones,
    each drawn in successive seeded permutations of its own (pooled, as batch_order, without `ratio`); the last
    `real_steps` steps draw real items only."""
    real, fake = np.flatnonzero(~synthetic), np.flatnonzero(synthetic)
    streams = {"real": (real, np.random.default_rng([seed, 11])), "fake": (fake, np.random.default_rng([seed, 12])),
               "all": (np.arange(len(synthetic)), np.random.default_rng(seed))}
    pending = {name: np.empty(0, dtype=np.int64) for name in streams}

    def take(name: str, count: int) -> np.ndarray:
        items, rng = streams[name]
        while len(pending[name]) < count:
            pending[name] = np.concatenate([pending[name], items[rng.permutation(len(items))]])
        chosen, pending[name] = pending[name][:count], pending[name][count:]
        return chosen

    for step in range(steps):
        if step >= steps - real_steps:
            yield take("real", batch_size)
        elif ratio is None:
            yield take("all", batch_size)
        else:
            count = round(ratio * batch_size) if len(real) else batch_size
            count = count if len(fake) else 0
            yield np.concatenate([take("real", batch_size - count), take("fake", count)])


def mixing_problem(settings: TrainSettings, synthetic: np.ndarray | None) -> str | None:
    """Why the synthetic-data keys cannot apply to these items, or None."""
    if not settings.mixes:
        return None
    if settings.synthetic_ratio is not None and not 0.0 <= settings.synthetic_ratio <= 1.0:
        return f"synthetic_ratio must be in [0, 1], got {settings.synthetic_ratio}"
    if settings.synthetic_weight < 0.0:
        return f"synthetic_weight must be >= 0, got {settings.synthetic_weight}"
    if not 0.0 <= settings.real_finetune_share < 1.0:
        return f"real_finetune_share must be in [0, 1), got {settings.real_finetune_share}"
    if synthetic is None or not synthetic.any() or synthetic.all():
        return "synthetic_ratio, synthetic_weight and real_finetune_share need real and synthetic items"
    return None


def _flip(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal and vertical flips per image (defect images have no preferred orientation)."""
    images, masks = images.copy(), masks.copy()
    for i in range(len(images)):
        if rng.random() < 0.5:
            images[i], masks[i] = images[i, :, ::-1], masks[i, :, ::-1]
        if rng.random() < 0.5:
            images[i], masks[i] = images[i, ::-1], masks[i, ::-1]
    return images, masks


def _zoom(image: np.ndarray, mask: np.ndarray, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random crop of 1/scale of the side, resized back (bilinear image, nearest mask)."""
    height, width = mask.shape
    crop_h, crop_w = max(1, round(height / scale)), max(1, round(width / scale))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    image = cv2.resize(image[top:top + crop_h, left:left + crop_w], (width, height), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask[top:top + crop_h, left:left + crop_w], (width, height), interpolation=cv2.INTER_NEAREST)
    return image, mask


def strong_augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Classic augmentation per image: a dihedral transform (flips and 90-degree turns of square images), a zoom
    into a random crop with probability 1/2, and brightness and contrast jitter of up to 20 % each."""
    images, masks = images.copy(), masks.copy()
    square = images.shape[1] == images.shape[2]
    for i in range(len(images)):
        image, mask = images[i], masks[i]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
        if square:
            turns = int(rng.integers(0, 4))
            image, mask = np.rot90(image, turns), np.rot90(mask, turns)
        if rng.random() < 0.5:
            image, mask = _zoom(np.ascontiguousarray(image), np.ascontiguousarray(mask),
                                float(rng.uniform(1.0, 1.5)), rng)
        contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-0.2, 0.2) * 255
        mean = image.mean()
        image = np.clip((image.astype(np.float32) - mean) * contrast + mean + brightness, 0, 255)
        images[i], masks[i] = image.astype(np.uint8), mask
    return images, masks


def segmentation_loss(num_classes: int, ignore_index: int | None = None) -> nn.Module:
    """Dice (smp) + cross-entropy, both skipping pixels labelled `ignore_index`."""
    from segmentation_models_pytorch.losses import DiceLoss

    class DiceCrossEntropy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dice = DiceLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index)
            self.cross_entropy = nn.CrossEntropyLoss(ignore_index=-100 if ignore_index is None else ignore_index)

        def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            return self.dice(logits, masks) + self.cross_entropy(logits, masks)

    return DiceCrossEntropy()


def _check_labels(masks: np.ndarray, num_classes: int, ignore_index: int | None) -> None:
    """Refuse label values that are neither a class id nor the ignored label (they would crash the loss)."""
    values = np.unique(masks)
    bad = [int(v) for v in values if not (0 <= v < num_classes) and v != ignore_index]
    if bad:
        raise ValueError(f"mask values {bad[:8]} are not class ids 0..{num_classes - 1}"
                         + (f" nor the ignored label {ignore_index}" if ignore_index is not None else ""))


@dataclass
class Selection:
    """Model selection during training: the validation score (higher is better) at each check, and the step
    whose weights the returned model holds."""

    scores: dict[int, float] = dataclasses.field(default_factory=dict)
    best_step: int = -1
    best_score: float = -math.inf


def train_segmenter(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    spec: SegmenterSpec,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    desc: str = "segmenter",
    progress: bool = True,
    validate: Callable[[nn.Module], float] | None = None,
    selection: Selection | None = None,
    synthetic: np.ndarray | None = None,
) -> tuple[nn.Module, float]:
    """Train a fresh segmenter on uint8 (H, W, 3) images and (H, W) class-id masks of one size.

    `synthetic` (bool per item) tells the synthetic items from the real ones for the settings' synthetic-data
    keys: a fixed synthetic share of each batch (`synthetic_ratio`), a weight of their loss (`synthetic_weight`:
    the batch loss is the weighted mean of the real rows' and the synthetic rows' losses) and a last share of the
    steps on real items only (`real_finetune_share`). At their defaults items are pooled and `synthetic` is unused.

    With `validate` (a score of the model in eval mode, higher is better, e.g. mIoU on a real validation split)
    and `settings.select_every`, the model is scored every that many steps and at the end, and the weights of
    the best check are returned (ties keep the earlier); the scores go into `selection` when given. Without it
    the last weights are returned. Returns the model (in eval mode, on `device`) and the mean loss of the last
    tenth of the steps.
    """
    images, masks = _stack(images, masks)
    _check_labels(masks, spec.num_classes, settings.ignore_index)
    if settings.steps < 1 or settings.batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {settings.steps} and {settings.batch_size}")
    augmentation = settings.augmentation
    problem = mixing_problem(settings, synthetic)
    if problem is not None:
        raise ValueError(problem)
    device = torch.device(device)
    model = build_segmenter(spec, settings.seed).to(device)
    loss_fn = segmentation_loss(spec.num_classes, settings.ignore_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    augment_rng = np.random.default_rng([settings.seed, 1])
    tail = max(1, math.ceil(settings.steps / 10))
    recent: list[float] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    selection = selection if selection is not None else Selection()
    best_state: dict[str, torch.Tensor] | None = None

    def check(step: int) -> None:
        nonlocal best_state
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            score = float(validate(model))
        model.train()
        selection.scores[step] = score
        if score > selection.best_score or best_state is None:
            selection.best_step, selection.best_score = step, score
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model.train()
    with torch.random.fork_rng(devices=devices), tqdm(total=settings.steps, desc=desc, unit="step",
                                                       dynamic_ncols=True, disable=not progress) as bar:
        torch.manual_seed(settings.seed)  # dropout
        if settings.mixes:
            real_steps = round(settings.real_finetune_share * settings.steps)
            order = mixed_batch_order(synthetic, settings.batch_size, settings.steps, settings.seed,
                                      settings.synthetic_ratio, real_steps)
        else:
            order = batch_order(len(images), settings.batch_size, settings.steps, settings.seed)
        for step, index in enumerate(order):
            batch_images, batch_masks = images[index], masks[index]
            if augmentation == "flip":
                batch_images, batch_masks = _flip(batch_images, batch_masks, augment_rng)
            elif augmentation == "strong":
                batch_images, batch_masks = strong_augment(batch_images, batch_masks, augment_rng)
            x = images_to_tensor(batch_images, device)
            y = torch.from_numpy(np.ascontiguousarray(batch_masks)).to(device).long()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                logits = model(x)
            loss = loss_fn(logits.float(), y) if settings.synthetic_weight == 1.0 else \
                _weighted_loss(loss_fn, logits.float(), y, synthetic[index], settings.synthetic_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            if step >= settings.steps - tail:
                recent.append(value)
            bar.update(1)
            if step % 10 == 0 or step == settings.steps - 1:
                bar.set_postfix(loss=f"{value:.3f}")
            done = step + 1
            if validate is not None and settings.select_every and \
                    (done % settings.select_every == 0 or done == settings.steps):
                check(done)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, float(np.mean(recent))


def _weighted_loss(loss_fn: nn.Module, logits: torch.Tensor, masks: torch.Tensor, synthetic: np.ndarray,
                   weight: float) -> torch.Tensor:
    """The batch loss with synthetic rows weighted: (n_real x L(real rows) + weight x n_synthetic x
    L(synthetic rows)) / (n_real + weight x n_synthetic), each L the loss (Dice + CE) of those rows alone."""
    rows = torch.from_numpy(np.asarray(synthetic, dtype=bool)).to(logits.device)
    total, norm = logits.new_zeros(()), 0.0
    for chosen, scale in ((~rows, 1.0), (rows, weight)):
        count = int(chosen.sum())
        if count and scale:
            total = total + scale * count * loss_fn(logits[chosen], masks[chosen])
            norm += scale * count
    return total / norm if norm else logits.sum() * 0.0


@torch.no_grad()
def predict(
    model: nn.Module, images: Sequence[np.ndarray] | np.ndarray, device: torch.device | str = "cpu",
    batch_size: int = 16,
    bf16: bool = False,
) -> np.ndarray:
    """Class ids (N, H, W, uint8 up to 256 classes) predicted for uint8 (N, H, W, 3) images of one size."""
    images = images if isinstance(images, np.ndarray) else np.stack(list(images))
    device = torch.device(device)
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images_to_tensor(images[start : start + batch_size], device))
        outputs.append(logits.argmax(dim=1).cpu().numpy())
    predicted = np.concatenate(outputs) if outputs else np.empty((0, *images.shape[1:3]), dtype=np.int64)
    return predicted.astype(np.uint8 if model_num_classes(model) <= 256 else np.int64)


def model_num_classes(model: nn.Module) -> int:
    """Number of output classes of an smp model (its segmentation head's last conv)."""
    convs = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels

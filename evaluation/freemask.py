"""FreeMask's two measures for synthetic data: filter badly synthesised regions, and measure how hard masks are.

A generator does not always draw what its mask says: a crack mask may come back as a clean tile, or a defect
may appear where the mask has background. Training a segmenter on such pairs teaches it wrong labels. FreeMask
(Yang et al., NeurIPS 2023) asks a segmenter trained on the real data - the *scorer* - how surprising each
synthetic pixel is, and ignores the pixels it finds far more surprising than is usual for their class:

1. The scorer: a segmentation_models_pytorch segmenter trained once on the real train split and cached on disk
   under a key made of a hash of the dataset's train files and the scorer settings (`load_or_train_scorer`).
   Without `allow_training` a missing scorer is a one-line CheckpointError, never a silent hour of training.
2. Per-pixel loss: the scorer's cross-entropy of each synthetic pixel against the label that conditioned it.
3. Per-class statistics over the whole synthetic set: mean and std of the loss of the pixels of each class.
   A pixel is ignored when its loss exceeds its class's mean + k x std. Per class, because a thin crack is
   always harder than background: one threshold for all would ignore every crack pixel and no background.
4. `labels_filtered/<stem>.png` beside the sample run: the label with 255 (IGNORE_INDEX) on ignored pixels, and
   `filter.json` with the images to drop: those whose ignored fraction exceeds `max_ignored_fraction`. The
   fraction is taken over the pixels labelled with a class other than 0 (drop_basis "foreground", the default:
   a defect is a few percent of an image, so a defect drawn nowhere near its mask ignores a small share of all
   pixels but most of the defect's) or over all pixels ("all": for datasets whose class 0 is no background).
   `filter.png` shows the ignored share per class and the histogram of the images' ignored fractions.

The same scorer measures how hard a real mask is (`mask_hardness`): the scorer's loss on the real image, averaged
per class present and then over those classes, so a mask with one small hard defect is not drowned by its
background. `main.py sample` with `hardness_args` draws masks in proportion to hardness^exponent
(guided_diffusion/sampling/hardness.py), measured by `measure_hardness` here, which main.py hands to the sample action.
The masks are the scorer's own training images; the loss on them is lower than on unseen images but still ranks
them: rare classes, small or faint defects stay harder to fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from guided_diffusion.config_io import read, require
from guided_diffusion.config import HardnessArgs, SampleConfig
from guided_diffusion.data import Pair, index_dataset, load_image, load_mask, resize_pair
from guided_diffusion.distributed import current_world, made_by_main
from guided_diffusion.errors import CheckpointError, ConfigError, DatasetError, UserError
from guided_diffusion.model_setup import select_device
from guided_diffusion.run_folder import write_json

from .image_sets import FILTER_REPORT, FILTERED_LABELS, IGNORE_INDEX, SampleFolder, class_names, load_pairs
from .segmenter.model import SegmenterSpec, TrainSettings, build_segmenter, images_to_tensor
from .segmenter.run import Scoring, train_and_test
from .segmenter.settings import ScorerSettings

DROP_BASES = ("foreground", "all")
"""What an image's ignored fraction is taken over: all its pixels, or those labelled with a class other than 0."""
SCORER_FILE, SCORER_INFO = "model.pt", "scorer.json"


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class FilterSettings:
    """When a synthetic pixel is ignored (loss > class mean + k x class std) and when an image is dropped. Checked
    when made (a one-line ConfigError); `from_dict` reads them from a JSON object by the one config routine."""

    k: float = 1.0
    max_ignored_fraction: float = 0.5
    drop_basis: str = "foreground"

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "filter") -> FilterSettings:
        """Read and check the settings strictly (one-line ConfigError naming '<where>.<key>')."""
        return read(cls, values, where)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(math.isfinite(self.k), "k", f"must be a finite number, got {self.k}")
        require(0.0 <= self.max_ignored_fraction <= 1.0, "max_ignored_fraction",
                f"must be in [0, 1] (1 = drop no image), got {self.max_ignored_fraction}")
        require(self.drop_basis in DROP_BASES, "drop_basis",
                f"must be one of {', '.join(DROP_BASES)}, got {self.drop_basis!r}")


# ---------------------------------------------------------------------------------------------------------------
# The scorer: trained once, cached by dataset hash + settings


def dataset_fingerprint(root: str | os.PathLike, pairs: Sequence[Pair]) -> str:
    """sha256 of the train pairs' relative paths and file bytes: any added, removed or edited file changes it,
    moving the whole dataset folder does not."""
    root = Path(root)
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.stem):
        for path in (pair.image, pair.mask):
            name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
            data = path.read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def scorer_key(fingerprint: str, settings: ScorerSettings, dataset_mode: str, num_classes: int) -> str:
    """The cache key: the dataset's fingerprint, how its masks are read, and every scorer setting."""
    described = json.dumps({"dataset": fingerprint, "dataset_mode": dataset_mode, "num_classes": num_classes,
                            "scorer": settings.to_dict()}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()


@dataclass
class Scorer:
    """A trained scorer on `device`, with where it is cached and what it was trained on (scorer.json)."""

    model: nn.Module
    settings: ScorerSettings
    num_classes: int
    folder: Path
    info: dict[str, Any]
    device: torch.device
    trained_now: bool

    def describe(self) -> dict[str, Any]:
        """What a report records about the scorer."""
        keep = ("key", "data_dir", "dataset_fingerprint", "train_images", "final_loss", "train_seconds",
                "test_miou", "test_miou_no_bg")
        return {"folder": str(self.folder), "trained_now": self.trained_now,
                **{k: self.info.get(k) for k in keep}, "settings": self.settings.to_dict()}


def training_command(data_dir: str | os.PathLike, settings: ScorerSettings, scorer_dir: str | os.PathLike,
                     dataset_mode: str = "multi-class") -> str:
    """The `evaluation/filter.sh` command that trains this scorer (settings that differ from the defaults
    become --scorer-* options, so the command makes the same cache key)."""
    options = [f"--data-dir {data_dir}", f"--scorer-dir {scorer_dir}", f"--scorer-image-size {settings.image_size}"]
    if dataset_mode != "multi-class":
        options.append(f"--dataset-mode {dataset_mode}")
    default = ScorerSettings()
    for name, value in settings.to_dict().items():
        if name != "image_size" and value != getattr(default, name):
            shown = str(value).lower() if isinstance(value, bool) else value
            options.append(f"--scorer-{name.replace('_', '-')} {shown}")
    return f"evaluation/filter.sh {' '.join(options)} --allow-training"


def _load_cached(folder: Path, key: str, settings: ScorerSettings, num_classes: int) -> tuple[nn.Module, dict]:
    """The model and info of a cache folder; CheckpointError when it is unreadable or made for another key."""
    try:
        info = json.loads((folder / SCORER_INFO).read_text(encoding="utf-8"))
        state = torch.load(folder / SCORER_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"scorer cache {folder}: cannot be read ({type(error).__name__}); delete the folder "
                              f"to train the scorer again") from None
    if info.get("key") != key:
        raise CheckpointError(f"scorer cache {folder}: {SCORER_INFO} holds another key; delete the folder")
    model = build_segmenter(SegmenterSpec(settings.architecture, num_classes, settings.encoder))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(f"scorer cache {folder}: {SCORER_FILE} does not fit a {settings.architecture} "
                              f"{settings.encoder} of {num_classes} classes; delete the folder") from None
    return model, info


def load_or_train_scorer(
    data_dir: str | os.PathLike,
    dataset_mode: str,
    num_classes: int,
    settings: ScorerSettings,
    scorer_dir: str | os.PathLike,
    allow_training: bool,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    progress: bool = True,
    missing_hint: str | None = None,
) -> Scorer:
    """The scorer of `data_dir`'s train split with `settings` (image_size must be set): loaded from
    `<scorer_dir>/scorer_<key>/`, or trained and saved there when `allow_training`.

    A missing scorer without `allow_training` raises CheckpointError with one line saying how to train it
    (`missing_hint` replaces the default advice). A cache folder appears whole or not at all: it is written
    under a temporary name and renamed."""
    if settings.image_size is None:
        raise ValueError("ScorerSettings.image_size must be resolved (at_size) before loading a scorer")
    device = torch.device(device)
    index = index_dataset(data_dir, dataset_mode, num_classes, require_test=False)
    fingerprint = dataset_fingerprint(data_dir, index.train)
    key = scorer_key(fingerprint, settings, dataset_mode, num_classes)
    folder = Path(scorer_dir) / f"scorer_{key[:16]}"
    if (folder / SCORER_INFO).is_file():
        model, info = _load_cached(folder, key, settings, num_classes)
        log(f"scorer: loaded {folder} ({settings.architecture} {settings.encoder}, {settings.image_size} px, "
            f"real test mIoU {info.get('test_miou', float('nan')):.3f})")
        return Scorer(model.to(device).eval(), settings, num_classes, folder, info, device, False)
    if not allow_training:
        hint = missing_hint or f"train it once with `{training_command(data_dir, settings, scorer_dir, dataset_mode)}`"
        raise CheckpointError(f"scorer cache {scorer_dir}: no scorer for dataset {data_dir} (train-file hash "
                              f"{fingerprint[:12]}) with these scorer settings ({settings.architecture} "
                              f"{settings.encoder}, {settings.image_size} px, {settings.steps} steps); {hint}")

    log(f"scorer: training {settings.architecture} {settings.encoder} on the {len(index.train)} real train images "
        f"at {settings.image_size} px for {settings.steps} steps")
    started = time.perf_counter()
    train = load_pairs(index.train, dataset_mode, settings.image_size, settings.resize_mode, "train")
    loading = time.perf_counter() - started
    # how good the scorer is, on the real test split when there is one: its filter is only as sharp as its
    # segmentation
    test = load_pairs(index.test, dataset_mode, settings.image_size, settings.resize_mode, "test") if index.test \
        else None
    run = train_and_test(train.images, train.masks, SegmenterSpec(settings.architecture, num_classes, settings.encoder),
                         TrainSettings(settings.steps, settings.batch_size, settings.lr, settings.weight_decay,
                                       settings.augment, settings.seed), Scoring(num_classes), device, test=test,
                         desc="scorer", progress=progress)
    model, final_loss, seconds = run.model, run.final_loss, loading + run.train_seconds
    info: dict[str, Any] = {"key": key, "data_dir": str(Path(data_dir).resolve()), "dataset_fingerprint": fingerprint,
                            "dataset_mode": dataset_mode, "num_classes": num_classes,
                            "settings": settings.to_dict(), "train_images": len(train),
                            "final_loss": round(final_loss, 5), "train_seconds": round(seconds, 1),
                            "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if run.test is not None:
        info.update(test_images=len(test), test_miou=round(run.test.miou, 5),
                    test_miou_no_bg=round(run.test.miou_no_bg, 5))
    _save_atomically(folder, model, info)
    log(f"scorer: saved {folder} ({seconds:.0f} s, final loss {final_loss:.3f}, real test mIoU "
        f"{info.get('test_miou', float('nan')):.3f})")
    return Scorer(model.eval(), settings, num_classes, folder, info, device, True)


def _save_atomically(folder: Path, model: nn.Module, info: dict[str, Any]) -> None:
    """Write model.pt + scorer.json into a temporary folder, then rename it to `folder` (a concurrent writer
    that finished first wins; its scorer, trained the same way, is kept)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, temporary / SCORER_FILE)
        write_json(temporary / SCORER_INFO, info)
        try:
            temporary.rename(folder)
        except OSError:
            if not (folder / SCORER_INFO).is_file():
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Per-pixel loss, class statistics, hardness


@torch.no_grad()
def pixel_losses(model: nn.Module, images: np.ndarray, masks: np.ndarray, device: torch.device | str = "cpu",
                 batch_size: int = 32) -> np.ndarray:
    """The scorer's cross-entropy of every pixel against its label: float32 (N, H, W) for uint8 (N, H, W, 3)
    images and (N, H, W) class ids of one size."""
    device = torch.device(device)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        logits = model(images_to_tensor(images[start:start + batch_size], device))
        target = torch.from_numpy(np.ascontiguousarray(masks[start:start + batch_size])).to(device).long()
        out.append(F.cross_entropy(logits.float(), target, reduction="none").cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, *masks.shape[1:]), np.float32)


@dataclass(frozen=True)
class ClassLossStats:
    """Per class id: the number of synthetic pixels, and the mean and std of their loss (NaN without pixels)."""

    pixels: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def thresholds(self, k: float) -> np.ndarray:
        """mean + k x std per class; +inf for a class without pixels (nothing to ignore)."""
        return np.where(self.pixels > 0, self.mean + k * self.std, np.inf)


class ClassLossAccumulator:
    """Sums of loss and squared loss per class, fed batch by batch, so the set never has to be in memory."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._count = np.zeros(num_classes, np.float64)
        self._sum = np.zeros(num_classes, np.float64)
        self._squares = np.zeros(num_classes, np.float64)

    def update(self, losses: np.ndarray, masks: np.ndarray) -> None:
        ids = np.asarray(masks).ravel().astype(np.int64)
        values = np.asarray(losses, np.float64).ravel()
        self._count += np.bincount(ids, minlength=self.num_classes)[:self.num_classes]
        self._sum += np.bincount(ids, values, minlength=self.num_classes)[:self.num_classes]
        self._squares += np.bincount(ids, values * values, minlength=self.num_classes)[:self.num_classes]

    def compute(self) -> ClassLossStats:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self._sum / self._count
            variance = np.maximum(self._squares / self._count - mean * mean, 0.0)
        return ClassLossStats(self._count.astype(np.int64), mean, np.sqrt(variance))


def class_loss_stats(losses: np.ndarray, masks: np.ndarray, num_classes: int) -> ClassLossStats:
    """ClassLossStats of in-memory losses and their labels."""
    accumulator = ClassLossAccumulator(num_classes)
    accumulator.update(losses, masks)
    return accumulator.compute()


def ignored_pixels(losses: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """True where a pixel's loss exceeds the threshold of its labelled class."""
    return np.asarray(losses) > np.asarray(thresholds)[np.asarray(masks).astype(np.int64)]


def ignored_fraction(ignored: np.ndarray, mask: np.ndarray, basis: str) -> float:
    """The share of one image's pixels that are ignored, over all pixels or over the foreground (class != 0)."""
    if basis == "all":
        return float(ignored.mean()) if ignored.size else 0.0
    foreground = np.asarray(mask) != 0
    return float(ignored[foreground].mean()) if foreground.any() else 0.0


def filtered_label(mask: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """The label with IGNORE_INDEX on ignored pixels (uint8)."""
    return np.where(ignored, IGNORE_INDEX, mask).astype(np.uint8)


def mask_hardness(losses: np.ndarray, masks: np.ndarray, num_classes: int) -> np.ndarray:
    """Per image: the mean over the classes present of the class's mean pixel loss (float64, N).

    Averaging per class first gives a small hard defect the weight of the background around it; a plain pixel
    mean would rank masks by how much background they have."""
    hardness = np.zeros(len(masks))
    for i, (loss, mask) in enumerate(zip(losses, masks)):
        ids = np.asarray(mask).ravel().astype(np.int64)
        counts = np.bincount(ids, minlength=num_classes)
        sums = np.bincount(ids, np.asarray(loss, np.float64).ravel(), minlength=num_classes)
        present = counts > 0
        hardness[i] = float((sums[present] / counts[present]).mean())
    return hardness


def real_mask_hardness(scorer: Scorer, pairs: Sequence[Pair], dataset_mode: str, batch_size: int = 64) -> np.ndarray:
    """The hardness of real (image, mask) pairs, each resized to the scorer's size as it was trained."""
    values = []
    size, mode = scorer.settings.image_size, scorer.settings.resize_mode
    for start in range(0, len(pairs), batch_size):
        chunk = load_pairs(pairs[start:start + batch_size], dataset_mode, size, mode, "candidates")
        losses = pixel_losses(scorer.model, chunk.images, chunk.masks, scorer.device)
        values.append(mask_hardness(losses, chunk.masks, scorer.num_classes))
    return np.concatenate(values) if values else np.zeros(0)


def measure_hardness(config: SampleConfig, pairs: Sequence[Pair], log: Callable[[str], None] = print
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """The hardness of a sample run's candidate pairs (`hardness_args` of `config`) and what its report records of
    the scorer: guided_diffusion/sampling/hardness.py's MeasureHardness, which main.py and the study hand to the sample
    action (guided_diffusion does not import this package). The scorer of config.data_dir comes from the cache;
    with hardness_args.allow_training a missing one is trained (rank 0 alone under a launcher, then every rank
    loads it), else a CheckpointError says how to train it."""
    args = config.hardness_args or HardnessArgs()
    settings = ScorerSettings.of_sample_config(config).at_size(config.image_size)
    command = training_command(config.data_dir, settings, args.scorer_dir, config.dataset_mode)
    hint = f"train it once with `{command}`, or set hardness_args.allow_training to true"

    def scorer_on(device: torch.device, allow_training: bool) -> Scorer:
        return load_or_train_scorer(config.data_dir, config.dataset_mode, config.num_classes, settings,
                                    args.scorer_dir, allow_training, device, log, missing_hint=hint)

    allow_training = args.allow_training
    if allow_training and current_world().size > 1:  # rank 0 trains a missing scorer alone; the others load it
        def train_on_main() -> str | None:
            try:
                scorer_on(select_device(config.device), True)
            except UserError as error:
                return str(error)
            return None

        problem = made_by_main(train_on_main)
        if problem:
            raise CheckpointError(problem)
        allow_training = False
    scorer = scorer_on(select_device(config.device), allow_training)
    return real_mask_hardness(scorer, list(pairs), config.dataset_mode), scorer.describe()


# ---------------------------------------------------------------------------------------------------------------
# Filtering a sample folder


def _stretch(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D float array (the loss map back to the label's size)."""
    if array.shape == (height, width):
        return array
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((width, height), Image.NEAREST))


def _scored_batches(folder: SampleFolder, scorer: Scorer, batch_size: int
                    ) -> Iterator[tuple[list[str], list[np.ndarray], list[np.ndarray]]]:
    """(stems, labels at their own size, loss maps at the same size) batch by batch. Each pair is stretched to
    the scorer's size (no resize when it is already that size) and its loss map stretched back."""
    size = scorer.settings.image_size
    for start in range(0, len(folder.pairs), batch_size):
        pairs = folder.pairs[start:start + batch_size]
        labels = [load_mask(pair.mask, "multi-class") for pair in pairs]
        scaled = [resize_pair(load_image(pair.image), label, size, "resize") for pair, label in zip(pairs, labels)]
        images = np.stack([image for image, _ in scaled])
        masks = np.stack([mask for _, mask in scaled])
        losses = pixel_losses(scorer.model, images, masks, scorer.device)
        yield ([pair.stem for pair in pairs], labels,
               [_stretch(loss, *label.shape) for loss, label in zip(losses, labels)])


def check_unfiltered(folder: Path) -> None:
    """DatasetError when a sample folder was filtered already (nothing written is ever overwritten)."""
    taken = [name for name in (FILTERED_LABELS, FILTER_REPORT) if (folder / name).exists()]
    if taken:
        raise DatasetError(f"sample folder {folder}: {' and '.join(taken)} exist already (filtered before); "
                           f"nothing is overwritten: delete them, or filter a copy of the run folder")


def filter_sample_folder(folder: SampleFolder, scorer: Scorer, settings: FilterSettings,
                         names: Sequence[str] | None = None, log: Callable[[str], None] = print,
                         batch_size: int = 64) -> dict[str, Any]:
    """Score every pair of a sample folder, write `labels_filtered/` and `filter.json` + `filter.png` into it,
    and return the report. Two passes over the pairs: the class statistics first, then the filtering."""
    started = time.perf_counter()
    num_classes = scorer.num_classes
    if num_classes > IGNORE_INDEX:
        raise ConfigError(f"num_classes {num_classes}: filtered labels use {IGNORE_INDEX} as 'ignore', so at most "
                          f"{IGNORE_INDEX} classes can be filtered")
    check_unfiltered(folder.path)
    names = list(names) if names else [f"class_{c}" for c in range(num_classes)]

    accumulator = ClassLossAccumulator(num_classes)
    for _, labels, losses in _scored_batches(folder, scorer, batch_size):
        for label, loss in zip(labels, losses):
            accumulator.update(loss, label)
    stats = accumulator.compute()
    thresholds = stats.thresholds(settings.k)

    ignored_per_class = np.zeros(num_classes, np.int64)
    per_image: list[dict[str, Any]] = []
    temporary = Path(tempfile.mkdtemp(prefix=f".{FILTERED_LABELS}.tmp-", dir=folder.path))
    try:
        for stems, labels, losses in _scored_batches(folder, scorer, batch_size):
            for stem, label, loss in zip(stems, labels, losses):
                ignored = ignored_pixels(loss, label, thresholds)
                ignored_per_class += np.bincount(label[ignored].astype(np.int64), minlength=num_classes)[:num_classes]
                fraction = ignored_fraction(ignored, label, settings.drop_basis)
                per_image.append({"stem": stem, "ignored_fraction": round(fraction, 6),
                                  "dropped": fraction > settings.max_ignored_fraction})
                Image.fromarray(filtered_label(label, ignored)).save(temporary / f"{stem}.png")
        dropped = [row["stem"] for row in per_image if row["dropped"]]
        report = {
            "sample_folder": str(folder.path),
            "labels": FILTERED_LABELS,
            "ignore_index": IGNORE_INDEX,
            "rule": f"a pixel is ignored when its scorer loss > its class's mean + {settings.k:g} x std over the "
                    f"synthetic set; an image is dropped when its ignored fraction ({settings.drop_basis} pixels) "
                    f"> {settings.max_ignored_fraction:g}",
            "settings": dataclasses.asdict(settings),
            "scorer": scorer.describe(),
            "images": len(per_image),
            "dropped_images": len(dropped),
            "kept_images": len(per_image) - len(dropped),
            "ignored_pixel_share": round(float(ignored_per_class.sum() / max(1, stats.pixels.sum())), 6),
            "classes": [{"id": c, "name": names[c], "pixels": int(stats.pixels[c]),
                         "loss_mean": _number(stats.mean[c]), "loss_std": _number(stats.std[c]),
                         "threshold": _number(thresholds[c]), "ignored_pixels": int(ignored_per_class[c]),
                         "ignored_share": _number(ignored_per_class[c] / stats.pixels[c]) if stats.pixels[c] else None}
                        for c in range(num_classes)],
            "dropped": dropped,
            "per_image": per_image,
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(folder.path / FILTER_REPORT, report)
        plot_filter_report(folder.path / Path(FILTER_REPORT).with_suffix(".png").name, report)
        temporary.rename(folder.path / FILTERED_LABELS)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    shares = ", ".join(f"{c['name']} {100 * c['ignored_share']:.1f}%" for c in report["classes"]
                       if c["ignored_share"] is not None)
    log(f"{folder.path}: ignored {100 * report['ignored_pixel_share']:.1f}% of the pixels ({shares}); dropped "
        f"{len(dropped)} of {len(per_image)} images; wrote {FILTERED_LABELS}/ and {FILTER_REPORT}")
    return report


def _number(value: float) -> float | None:
    """A finite float rounded for JSON, or None (JSON has no NaN or infinity)."""
    return round(float(value), 6) if np.isfinite(value) else None


def plot_filter_report(path: Path, report: dict[str, Any]) -> None:
    """filter.png: the ignored share per class (bars, labelled with the pixel counts) and the histogram of the
    images' ignored fractions with the drop limit."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    figure = Figure(figsize=(11, 4), dpi=100)
    left, right = figure.subplots(1, 2)
    classes = [c for c in report["classes"] if c["pixels"]]
    left.bar([c["name"] for c in classes], [100 * c["ignored_share"] for c in classes], color="tab:red")
    for i, c in enumerate(classes):
        left.annotate(f"{c['ignored_pixels']}/{c['pixels']}", (i, 100 * c["ignored_share"]), ha="center",
                      va="bottom", fontsize=7)
    left.set_ylabel("ignored pixels of the class (%)")
    left.set_title(f"ignored share per class (all: {100 * report['ignored_pixel_share']:.1f}%)", fontsize=10)
    left.tick_params(axis="x", labelrotation=30, labelsize=8)
    fractions = [row["ignored_fraction"] for row in report["per_image"]]
    right.hist(fractions, bins=30, range=(0, 1), color="tab:blue")
    limit = report["settings"]["max_ignored_fraction"]
    right.axvline(limit, color="black", linestyle="--", label=f"drop limit {limit:g}")
    right.set_xlabel(f"ignored fraction of an image ({report['settings']['drop_basis']} pixels)")
    right.set_ylabel("images")
    right.set_title(f"{report['dropped_images']} of {report['images']} images dropped", fontsize=10)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def filter_folders(folders: Sequence[SampleFolder], data_dir: str, dataset_mode: str, num_classes: int,
                   scorer_settings: ScorerSettings, settings: FilterSettings, scorer_dir: str, allow_training: bool,
                   device: torch.device | str, log: Callable[[str], None] = print,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Filter each sample folder with the scorer of its image size (one scorer per size, cached)."""
    for folder in folders:
        check_unfiltered(folder.path)  # before any training
    names = class_names(data_dir, num_classes)
    scorers: dict[int, Scorer] = {}
    reports = []
    for folder in folders:
        size = scorer_settings.image_size or sample_size(folder)
        if size not in scorers:
            scorers[size] = load_or_train_scorer(data_dir, dataset_mode, num_classes, scorer_settings.at_size(size),
                                                 scorer_dir, allow_training, device, log, progress)
        reports.append(filter_sample_folder(folder, scorers[size], settings, names, log))
    return reports


def sample_size(folder: SampleFolder) -> int:
    """The image size a sample folder was made at: its config.json's image_size, else its first label's width
    (rounded up to a multiple of 32 for the encoders)."""
    try:
        size = json.loads((folder.path / "config.json").read_text(encoding="utf-8")).get("image_size")
    except (OSError, ValueError, AttributeError):
        size = None
    if not isinstance(size, int) or isinstance(size, bool):
        with Image.open(folder.pairs[0].mask) as label:
            size = max(label.size)
    return max(32, int(math.ceil(size / 32) * 32))

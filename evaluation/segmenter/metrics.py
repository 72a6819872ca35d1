"""The metric set of a segmentation test: IoU (per class, dataset level and per image), F1 and accuracy.

Every number comes from torchmetrics; this module only chooses the metrics, feeds them batches and names the
results. Two definitions matter when comparing with other work:

- dataset-level IoU of a class: one confusion matrix over all test pixels, IoU = TP / (TP + FP + FN). A class
  that appears neither in the targets nor in the predictions has no IoU (NaN) and is left out of the means.
- per-image IoU of a class: the IoU in each image where the class appears in the target or the prediction,
  averaged over those images (torchmetrics' ``MeanIoU`` with ``per_class=True``). An image without the class
  where the model also predicts none of it does not count for that class.

mIoU is the mean over classes with an IoU, with the background class and without it ("no_bg"). The background is
class 0 unless `background_class` says otherwise; with `background_class=None` (scene datasets whose class 0 is
sky or road) "no_bg" is the mean over every class. Pixels equal to ``ignore_index`` (for example 255 for
"unlabelled") count nowhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # imported where the metrics are made: torchmetrics pulls in torchvision (3 s)
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex
    from torchmetrics.segmentation import MeanIoU

SUMMARY_METRICS = ("miou", "miou_no_bg", "image_miou", "image_miou_no_bg", "f1", "f1_no_bg", "accuracy",
                   "class_accuracy")
"""The scalar metrics, in the order tables show them."""

METRIC_LABELS = {
    "miou": "mIoU",
    "miou_no_bg": "mIoU w/o bg",
    "image_miou": "per-image mIoU",
    "image_miou_no_bg": "per-image mIoU w/o bg",
    "f1": "F1",
    "f1_no_bg": "F1 w/o bg",
    "accuracy": "pixel acc.",
    "class_accuracy": "mean class acc.",
}


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there is none (so an undefined mean stays visibly undefined)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _class_mean(field: str, without_background: bool = False) -> property:
    """A property: the mean over the classes of a per-class field (NaN where none is defined), without the
    background class when asked."""

    def mean(metrics: SegmentationMetrics) -> float:
        values = getattr(metrics, field)
        return _nanmean(metrics._without_background(values) if without_background else values)

    return property(mean)


@dataclass(frozen=True)
class SegmentationMetrics:
    """The metric set of one test. Per-class lists have one entry per class id (NaN where undefined)."""

    class_iou: tuple[float, ...]
    class_image_iou: tuple[float, ...]
    class_f1: tuple[float, ...]
    accuracy: float
    class_accuracy: float
    num_images: int
    num_pixels: int
    background_class: int | None = 0

    def _without_background(self, values: tuple[float, ...]) -> list[float]:
        return [v for i, v in enumerate(values) if i != self.background_class]

    miou = _class_mean("class_iou")
    miou_no_bg = _class_mean("class_iou", without_background=True)
    image_miou = _class_mean("class_image_iou")
    image_miou_no_bg = _class_mean("class_image_iou", without_background=True)
    f1 = _class_mean("class_f1")
    f1_no_bg = _class_mean("class_f1", without_background=True)

    def scalars(self) -> dict[str, float]:
        """The scalar metrics keyed by the names in SUMMARY_METRICS."""
        return {name: float(getattr(self, name)) for name in SUMMARY_METRICS}

    def row(self, class_names: Sequence[str]) -> dict[str, float]:
        """A flat CSV row: the scalars, then iou_<class>, image_iou_<class> and f1_<class> for every class."""
        if len(class_names) != len(self.class_iou):
            raise ValueError(f"{len(class_names)} class names for {len(self.class_iou)} classes")
        row = self.scalars()
        for prefix, values in (("iou", self.class_iou), ("image_iou", self.class_image_iou), ("f1", self.class_f1)):
            row.update({f"{prefix}_{name}": float(value) for name, value in zip(class_names, values)})
        return row


def metric_columns(class_names: Sequence[str]) -> list[str]:
    """The column names of SegmentationMetrics.row, in order."""
    columns = list(SUMMARY_METRICS)
    for prefix in ("iou", "image_iou", "f1"):
        columns += [f"{prefix}_{name}" for name in class_names]
    return columns


@dataclass
class MetricAccumulator:
    """Feeds batches of (predicted, target) class-id maps to the torchmetrics objects; `compute` gives the set.

    Batches keep memory flat: a whole test set never has to be held as one tensor.
    """

    num_classes: int
    ignore_index: int | None = None
    background_class: int | None = 0
    _dataset_iou: MulticlassJaccardIndex = field(init=False)
    _f1: MulticlassF1Score = field(init=False)
    _accuracy: MulticlassAccuracy = field(init=False)
    _class_accuracy: MulticlassAccuracy = field(init=False)
    _image_iou: MeanIoU = field(init=False)
    _num_images: int = field(init=False, default=0)
    _num_pixels: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            raise ValueError(f"ignore_index {self.ignore_index} is a class id (0..{self.num_classes - 1})")
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex
        from torchmetrics.segmentation import MeanIoU

        common = {"num_classes": self.num_classes, "ignore_index": self.ignore_index}
        nan = math.nan
        self._dataset_iou = MulticlassJaccardIndex(average="none", zero_division=nan, **common)
        # F1 takes only 0 or 1 for 0/0; its 0/0 case (TP + FP + FN = 0) is the IoU's, so compute() makes it NaN
        self._f1 = MulticlassF1Score(average="none", zero_division=0, **common)
        self._accuracy = MulticlassAccuracy(average="micro", **common)
        self._class_accuracy = MulticlassAccuracy(average="macro", **common)
        # ignored pixels become an extra class in prediction and target alike, which is then dropped: they add
        # to no other class's intersection or union
        extra = 1 if self.ignore_index is not None else 0
        self._image_iou = MeanIoU(num_classes=self.num_classes + extra, per_class=True, input_format="index")

    def update(self, preds: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> None:
        """Add a batch: preds and targets are int class-id maps of the same shape (N, H, W) or (H, W)."""
        preds, targets = torch.as_tensor(preds).long().cpu(), torch.as_tensor(targets).long().cpu()
        if preds.shape != targets.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} differs from target shape {tuple(targets.shape)}")
        if preds.dim() == 2:
            preds, targets = preds[None], targets[None]
        if preds.dim() != 3:
            raise ValueError(f"expected class-id maps of shape (N, H, W), got {tuple(preds.shape)}")
        for metric in (self._dataset_iou, self._f1, self._accuracy, self._class_accuracy):
            metric.update(preds, targets)
        if self.ignore_index is not None:
            ignored = targets == self.ignore_index
            preds = preds.masked_fill(ignored, self.num_classes)
            targets = targets.masked_fill(ignored, self.num_classes)
            self._num_pixels += int((~ignored).sum())
        else:
            self._num_pixels += targets.numel()
        self._image_iou.update(preds, targets)
        self._num_images += preds.shape[0]

    def compute(self) -> SegmentationMetrics:
        """The metric set of everything added so far."""
        if self._num_images == 0:
            raise ValueError("no images were added to the metrics")
        image_iou = self._image_iou.compute()[: self.num_classes]
        image_iou = torch.where(image_iou < 0, torch.nan, image_iou)  # MeanIoU marks absent classes with -1
        class_iou = self._dataset_iou.compute()
        class_f1 = torch.where(class_iou.isnan(), torch.nan, self._f1.compute())
        return SegmentationMetrics(
            class_iou=tuple(float(v) for v in class_iou),
            class_image_iou=tuple(float(v) for v in image_iou),
            class_f1=tuple(float(v) for v in class_f1),
            accuracy=float(self._accuracy.compute()),
            class_accuracy=float(self._class_accuracy.compute()),
            num_images=self._num_images,
            num_pixels=self._num_pixels,
            background_class=self.background_class,
        )


def segmentation_metrics(
    preds: torch.Tensor | np.ndarray | Sequence[np.ndarray],
    targets: torch.Tensor | np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    ignore_index: int | None = None,
    background_class: int | None = 0,
) -> SegmentationMetrics:
    """The metric set of predicted vs target class-id maps (arrays (N, H, W), or lists of (H, W) maps whose sizes
    may differ between images)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    accumulator = MetricAccumulator(num_classes, ignore_index, background_class)
    for pred, target in zip(preds, targets):
        accumulator.update(pred, target)
    return accumulator.compute()

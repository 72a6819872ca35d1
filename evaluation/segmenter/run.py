"""One segmenter run, the same for evaluate.sh, the study and FreeMask's scorer: train, choose, test, align.

`train_and_test` trains a fresh segmenter on a training set (model.train_segmenter), keeps the weights of its best
check on a validation set when it is given one, scores it on a test set and on generated sets (label alignment),
all with one `Scoring`. The parts differ only in the options they pass:

- evaluate.sh: no validation set (the last weights are kept), fp32, real and synthetic items pooled; the
  segmenters trained on all real images also score each sample folder (label alignment).
- the study: the real validation split every `select_every` steps, bf16 where the processor runs it natively,
  synthetic items told apart (`synthetic`, for the variants' synthetic_ratio, synthetic_weight and
  real_finetune_share); its label alignment is a unit of its own, run later with the saved weights (`score`).
- FreeMask's scorer: no validation set, scored on the real test split when the dataset has one.

Label alignment (the SDM paper's measure of how well samples follow their masks): a segmenter trained on real data
segments the synthetic images; the mIoU of its predictions against the masks that conditioned those images says
whether the samples show the classes where the masks put them. A generator that ignores its masks scores near
chance; one that follows them scores near the segmenter's mIoU on real test images (the natural ceiling, reported
beside it). The score measures the generator only as far as the segmenter is good, so compare sample folders with
the same segmenter, not scores across segmenters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..image_sets import ImageSet
from .metrics import SegmentationMetrics, segmentation_metrics
from .model import SegmenterSpec, Selection, TrainSettings, predict, train_segmenter


@dataclass(frozen=True)
class Scoring:
    """How predictions are scored, alike on validation, test and generated images: the number of classes, the
    label the metrics skip, the class the no-background means leave out, and bf16 autocast of the predictions."""

    num_classes: int
    ignore_index: int | None = None
    background_class: int | None = 0
    bf16: bool = False


def score(model: nn.Module, images: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray,
          scoring: Scoring, device: torch.device | str = "cpu") -> SegmentationMetrics:
    """The metrics of the model's predictions for uint8 (N, H, W, 3) images against (N, H, W) class-id masks. On
    generated images and the masks they were made from, this is the label-alignment score."""
    predicted = predict(model, images, device, bf16=scoring.bf16)
    return segmentation_metrics(predicted, masks, scoring.num_classes, scoring.ignore_index, scoring.background_class)


def validation_score(metrics: SegmentationMetrics) -> float:
    """What the choice of weights maximises: the mIoU without background, -1 where it is undefined (no class but
    the background in the validation masks and predictions)."""
    return -1.0 if math.isnan(metrics.miou_no_bg) else metrics.miou_no_bg


@dataclass
class SegmenterRun:
    """A trained segmenter and its scores."""

    model: nn.Module  # in eval mode, on the device
    test: SegmentationMetrics | None  # None without a test set
    alignment: dict[str, SegmentationMetrics]  # per generated set, by its name
    final_loss: float  # the mean loss of the last tenth of the steps
    train_seconds: float  # the training alone (with its validation checks), not the scoring after it
    selection: Selection  # the validation checks and the step chosen (none without a validation set)


def train_and_test(
    images: np.ndarray,
    masks: np.ndarray,
    spec: SegmenterSpec,
    settings: TrainSettings,
    scoring: Scoring,
    device: torch.device | str = "cpu",
    *,
    validation: ImageSet | None = None,
    test: ImageSet | None = None,
    generated: Sequence[ImageSet] = (),
    synthetic: np.ndarray | None = None,
    desc: str = "segmenter",
    progress: bool = True,
) -> SegmenterRun:
    """Train a fresh segmenter of `spec` with `settings` on uint8 (N, H, W, 3) images and (N, H, W) class-id masks,
    then score it on `test` and on each of the `generated` sets (label alignment).

    With `validation` (and `settings.select_every`), the model is scored on it every that many steps and at the
    end (`validation_score`), and the weights of the best check are kept; without it, the last weights.
    `synthetic` (bool per item) tells the synthetic items apart for the settings' synthetic-data keys (see
    train_segmenter). Every score is taken with `scoring`."""
    selection = Selection()
    validate = None
    if validation is not None:
        def validate(model: nn.Module) -> float:
            return validation_score(score(model, validation.images, validation.masks, scoring, device))

    started = time.perf_counter()
    model, final_loss = train_segmenter(images, masks, spec, settings, device, desc=desc, progress=progress,
                                        validate=validate, selection=selection, synthetic=synthetic)
    seconds = time.perf_counter() - started
    tested = None if test is None else score(model, test.images, test.masks, scoring, device)
    alignment = {made.name: score(model, made.images, made.masks, scoring, device) for made in generated}
    return SegmenterRun(model, tested, alignment, final_loss, seconds, selection)

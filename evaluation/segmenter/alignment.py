"""The label-alignment score (the SDM paper's measure of how well samples follow their masks).

A segmenter trained on real data segments the synthetic images; the mIoU of its predictions against the masks
that conditioned those images says whether the samples show the classes where the masks put them. A generator
that ignores its masks scores near chance; one that follows them scores near the segmenter's mIoU on real test
images (the natural ceiling, reported beside it). The score measures the generator only as far as the
segmenter is good, so compare sample folders with the same segmenter, not scores across segmenters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .metrics import SegmentationMetrics, segmentation_metrics
from .model import predict


def label_alignment_score(
    model: nn.Module,
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    num_classes: int,
    device: torch.device | str = "cpu",
    ignore_index: int | None = None,
    batch_size: int = 16,
    background_class: int | None = 0,
) -> SegmentationMetrics:
    """Segment `images` (uint8 (N, H, W, 3)) with a segmenter trained on real data and score the predictions
    against `masks`, the class-id masks the images were generated from."""
    predicted = predict(model, images, device, batch_size)
    return segmentation_metrics(predicted, masks, num_classes, ignore_index, background_class)

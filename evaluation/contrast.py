"""Defect contrast: how much darker or brighter than its surroundings each class is drawn in an image set.

For every image and class it holds, the mean grey level (0..255) of the class's pixels minus the mean grey level
of a ring around them: the pixels 3 to 8 px away (square dilation) that belong to no other part of that class and
are not ignored. Real images give each class its typical contrast (on magnetic-tile blowholes and cracks are
dark, uneven areas bright); a generator's images should show the same numbers. A contrast near 0 where the real
one is not says the generator paints that class invisibly, and a segmenter cannot learn it from those images;
one far beyond the real says the painted objects stand out more than real ones do. It needs no segmenter, so it
reads the same for every fraction and seed, beside label alignment, which needs one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

INNER, OUTER = 3, 8  # the ring's distance from the class, in pixels (square dilation)
MIN_PIXELS = 4  # a class (or its ring) of fewer pixels in an image is left out for that image


@dataclass(frozen=True)
class Contrast:
    """One class over an image set: mean and standard deviation of the per-image contrasts, and their count."""

    mean: float
    std: float
    images: int

    def text(self) -> str:
        return "–" if not self.images else f"{self.mean:+.1f} ± {self.std:.1f} ({self.images})"


def class_contrast(images: np.ndarray, masks: np.ndarray, classes: list[int],
                   ignore_index: int | None = None) -> dict[int, Contrast]:
    """Per class of `classes`: the contrast of its pixels with their ring over the images (uint8 N×H×W or
    N×H×W×C, grey = the channels' mean) and class-id masks (N×H×W) that hold it."""
    grey = images.astype(np.float64)
    if grey.ndim == 4:
        grey = grey.mean(axis=-1)
    values: dict[int, list[float]] = {c: [] for c in classes}
    square = np.ones((3, 3), bool)
    for image, mask in zip(grey, masks):
        usable = np.ones(mask.shape, bool) if ignore_index is None else mask != ignore_index
        for c in classes:
            region = mask == c
            if region.sum() < MIN_PIXELS:
                continue
            near = ndimage.binary_dilation(region, square, iterations=INNER)
            ring = ndimage.binary_dilation(region, square, iterations=OUTER) & ~near & usable
            if ring.sum() < MIN_PIXELS:
                continue
            values[c].append(float(image[region].mean() - image[ring].mean()))
    return {c: Contrast(float(np.mean(v)) if v else float("nan"), float(np.std(v)) if v else float("nan"), len(v))
            for c, v in values.items()}

"""How each class is drawn in an image set: its contrast with its surroundings and the roughness of its pixels.

Contrast: for every image and class it holds, the mean grey level (0..255) of the class's pixels minus the mean
grey level of a ring around them: the pixels 3 to 8 px away (square dilation) that belong to no other part of that
class and are not ignored. Real images give each class its typical contrast (on magnetic-tile blowholes and cracks
are dark, uneven areas bright); a generator's images should show the same numbers. A contrast near 0 where the
real one is not says the generator paints that class invisibly, and a segmenter cannot learn it from those images;
one far beyond the real says the painted objects stand out more than real ones do. The report names the classes
a generator draws further from the real mean than the real images' own spread (`contrast_off`).

Roughness: for every image and class it holds, the mean |pixel - median of its 3x3 neighbourhood| in grey levels
over the class's pixels. It is small on smooth texture and large on pixel noise. A generator whose classes are much
rougher than the real ones paints them as noise; such regions are easy for a segmenter to find, so they can score a
high label alignment without looking like the real objects.

Neither needs a segmenter, so both read the same for every fraction and seed, beside label alignment, which needs
one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

INNER, OUTER = 3, 8  # the contrast ring's distance from the class, in pixels (square dilation)
MIN_PIXELS = 4  # a class (or its ring) of fewer pixels in an image is left out for that image
ROUGHER = 2.0  # a generator's class this many times rougher than the real images' is flagged in the report


@dataclass(frozen=True)
class ClassStat:
    """One class over an image set: mean and standard deviation of a per-image value, and the images counted."""

    mean: float
    std: float
    images: int

    def text(self, signed: bool = True) -> str:
        sign = "+" if signed else ""
        return f"{self.mean:{sign}.1f} ± {self.std:.1f} ({self.images})" if self.images else "–"


@dataclass(frozen=True)
class ImageSetLook:
    """How an image set draws each class: `contrast` for each class but the background, `roughness` for each."""

    contrast: dict[int, ClassStat]
    roughness: dict[int, ClassStat]

    def rougher_than(self, real: ImageSetLook) -> list[int]:
        """The classes this set draws more than ROUGHER times as rough as `real` does (both measured)."""
        return [c for c, mine in self.roughness.items()
                if c in real.roughness and mine.images and real.roughness[c].images
                and mine.mean > ROUGHER * real.roughness[c].mean]

    def contrast_off(self, real: ImageSetLook) -> list[int]:
        """The classes whose mean contrast here lies further from the real mean than the real images' spread
        (their standard deviation): drawn clearly darker, brighter or fainter than the real objects. A class in
        fewer than 2 real images (no spread), or not drawn here, is not compared."""
        return [c for c, mine in self.contrast.items()
                if c in real.contrast and mine.images and real.contrast[c].images >= 2
                and abs(mine.mean - real.contrast[c].mean) > real.contrast[c].std]


def _stats(values: dict[int, list[float]]) -> dict[int, ClassStat]:
    return {c: ClassStat(float(np.mean(v)) if v else float("nan"), float(np.std(v)) if v else float("nan"), len(v))
            for c, v in values.items()}


def _grey(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W or N×H×W×C images as float grey levels (the channels' mean); grey levels pass through."""
    grey = np.asarray(images, dtype=np.float64)
    return grey.mean(axis=-1) if grey.ndim == 4 else grey


def class_contrast(images: np.ndarray, masks: np.ndarray, classes: list[int],
                   ignore_index: int | None = None) -> dict[int, ClassStat]:
    """Per class of `classes`: the contrast of its pixels with their ring over the images (uint8 N×H×W or
    N×H×W×C, grey = the channels' mean) and class-id masks (N×H×W) that hold it."""
    values: dict[int, list[float]] = {c: [] for c in classes}
    square = np.ones((3, 3), bool)
    for image, mask in zip(_grey(images), masks):
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
    return _stats(values)


def class_roughness(images: np.ndarray, masks: np.ndarray, classes: list[int]) -> dict[int, ClassStat]:
    """Per class of `classes`: the mean |grey - its 3x3 median| over the class's pixels, over the images (as in
    class_contrast) that hold at least MIN_PIXELS of it. Image borders repeat their edge pixels."""
    values: dict[int, list[float]] = {c: [] for c in classes}
    for image, mask in zip(_grey(images), masks):
        deviation = np.abs(image - ndimage.median_filter(image, size=3, mode="nearest"))
        for c in classes:
            region = mask == c
            if region.sum() >= MIN_PIXELS:
                values[c].append(float(deviation[region].mean()))
    return _stats(values)


def image_set_look(images: np.ndarray, masks: np.ndarray, classes: list[int], background_class: int | None,
                   ignore_index: int | None = None) -> ImageSetLook:
    """The contrast of each class of `classes` but `background_class`, and the roughness of each."""
    grey = _grey(images)  # once for both
    return ImageSetLook(class_contrast(grey, masks, [c for c in classes if c != background_class], ignore_index),
                        class_roughness(grey, masks, classes))

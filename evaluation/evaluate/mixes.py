"""Training mixes named as ISDM names them: `R<real>F<synthetic>`.

`R100F300` trains on 100 real + 300 synthetic images; `ALL` stands for every image of that kind (`RALLF300`,
`R050FALL`). A missing part means none: `RALL` = `RALLF000`, `FALL` = `R000FALL`, `R000F300` = synthetic only.

Which images a mix takes depends on the seed only, not on the mix: for a seed, the real images are the first
`<real>` of one seeded permutation of the real training set, and the synthetic images the first `<synthetic>` of
another. So R100F000 and R100F300 share their 100 real images, and F300 holds the images of F100: differences
between mixes come from the added images, not from a different draw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guided_diffusion.errors import ConfigError

_PATTERN = re.compile(r"^(?:R(?P<real>\d+|ALL))?(?:F(?P<fake>\d+|ALL))?$", re.IGNORECASE)


@dataclass(frozen=True)
class Mix:
    """A training mix; None means all images of that kind."""

    real: int | None
    synthetic: int | None

    @property
    def name(self) -> str:
        """The canonical name, e.g. R100F300, RALLF000, R000FALL (three digits at least, as ISDM writes them)."""
        def part(count: int | None) -> str:
            return "ALL" if count is None else f"{count:03d}"
        return f"R{part(self.real)}F{part(self.synthetic)}"

    def counts(self, num_real: int, num_synthetic: int) -> tuple[int, int]:
        """(real, synthetic) image counts of this mix; ConfigError when it asks for more images than exist."""
        real = num_real if self.real is None else self.real
        synthetic = num_synthetic if self.synthetic is None else self.synthetic
        if real > num_real:
            raise ConfigError(f"key 'mixes': {self.name} asks for {real} real images but the train split has "
                              f"{num_real}")
        if synthetic > num_synthetic:
            where = "the sample folders hold" if num_synthetic else "no sample folder was given, so there are"
            raise ConfigError(f"key 'mixes': {self.name} asks for {synthetic} synthetic images but {where} "
                              f"{num_synthetic}")
        if real + synthetic == 0:
            raise ConfigError(f"key 'mixes': {self.name} has no training images")
        return real, synthetic

    @property
    def uses_synthetic(self) -> bool:
        return self.synthetic is None or self.synthetic > 0

    @property
    def is_all_real_only(self) -> bool:
        """All real images and no synthetic one: the baseline, and the segmenter of the label-alignment score."""
        return self.real is None and self.synthetic == 0


def parse_mix(text: str) -> Mix:
    """Parse a mix name such as 'R100F300', 'RALL', 'FALL' or 'R000F050' (case-insensitive)."""
    match = _PATTERN.match(text.strip()) if isinstance(text, str) else None
    if match is None or (match["real"] is None and match["fake"] is None):
        raise ConfigError(f"key 'mixes': {text!r} is not a mix name; write R<real>F<synthetic> with counts or ALL, "
                          "e.g. RALLF000, R100F300, FALL")

    def count(value: str | None) -> int | None:
        if value is None:
            return 0
        return None if value.upper() == "ALL" else int(value)

    mix = Mix(count(match["real"]), count(match["fake"]))
    if mix.real == 0 and mix.synthetic == 0:
        raise ConfigError(f"key 'mixes': {text!r} has no training images")
    return mix


def parse_mixes(texts: Sequence[str]) -> list[Mix]:
    """Parse mix names, refusing the same mix twice (e.g. 'RALL' and 'RALLF000')."""
    mixes = [parse_mix(text) for text in texts]
    seen: dict[Mix, str] = {}
    for text, mix in zip(texts, mixes):
        if mix in seen:
            raise ConfigError(f"key 'mixes': {text!r} is the same mix as {seen[mix]!r} ({mix.name})")
        seen[mix] = text
    return mixes


def chosen_indices(count: int, available: int, seed: int, kind: str) -> list[int]:
    """The first `count` of a permutation of range(available) seeded by (seed, kind); nested across counts."""
    if not 0 <= count <= available:
        raise ValueError(f"cannot choose {count} of {available}")
    salt = {"real": 0, "synthetic": 1}[kind]
    return sorted(np.random.default_rng([seed, salt, 7919]).permutation(available)[:count].tolist())

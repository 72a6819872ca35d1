"""A unit of the study and its work: the types the plan (plan.py) is made of, and the arithmetic of a unit's work.

A unit is what the study's ledger records: an SDM trained or finetuned, a mask generator trained, a generator
sampled or filtered, a segmenter trained and scored, a label alignment. Its work is a few `Term`s, each a count
of one `Rate` (an SDM's training step, a forward call of the sampler, a segmenter's step or predicted image):
the estimate times each rate on this machine, the progress lines calibrate them on the units already run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from guided_diffusion.config import PAINTING_MODES
from guided_diffusion.guidance import guided_share
from guided_diffusion.sampling.inpaint import start_step
from guided_diffusion.sampling.mask_selection import TrainedWith
from guided_diffusion.sampling.sample import sampling_diffusion

from .config import StudyConfig

UNIT_KINDS = ("sdm-train", "sdm-finetune", "masks-train", "sample", "filter", "segmenter", "alignment")
"""The kinds of unit a plan holds (the ledger's `kind`)."""


@dataclass(frozen=True)
class SplitSizes:
    """Images in the study's split: validation, each real subset (by fraction) and test."""

    val: int
    subsets: dict[float, int]
    test: int

    @classmethod
    def of(cls, split) -> SplitSizes:
        """The sizes of a study.Split."""
        return cls(len(split.val), {fraction: len(pairs) for fraction, pairs in split.subsets.items()},
                   len(split.test))


@dataclass(frozen=True)
class Rate:
    """One kind of timed work: what `estimate.Timings` measures, and what the progress lines calibrate."""

    model: str  # "sdm", "masks" (a mask generator) or "segmenter"
    what: str  # "train_step", "finetune_step", "forward" (one network call) or "predict_image"
    rows: int  # images through the network each time: a step's batch, a forward call's rows, 1 predicted image
    side: int  # their side in pixels (a training crop where there is one)
    values: dict[str, Any] = field(default_factory=dict, compare=False)  # the model's config values

    @property
    def megapixels(self) -> float:
        return self.rows * self.side * self.side / 1e6


@dataclass(frozen=True)
class Term:
    """`count` times the work of `rate`: steps, network calls or predicted images."""

    count: float
    rate: Rate


@dataclass(frozen=True)
class Part:
    """A row of the estimate that a unit does once: the units of one stage do the same work."""

    stage: str
    work: str
    terms: tuple[Term, ...] = ()


@dataclass(frozen=True)
class PlannedUnit:
    """A unit of the study: its ledger kind, where it sits (fraction first, then the generator or variant, the
    seed), its work, and the units it needs, each under the role its executor reads it by (("model",
    "sdm-finetune/r025/sdm"), ("source", ...), a generator's name for a segmenter's synthetic sets).

    Its fingerprint (the ledger key) is made by its executor from its inputs and the ledger entries of the units
    it needs: a sample's key holds its SDM's run folder, a segmenter's the keys of its synthetic sets."""

    kind: str
    where: tuple
    parts: tuple[Part, ...]
    needs: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        """'segmenter/r025/paste/3': kind, fraction and the rest of `where` (a Slurm job's name, `--unit`)."""
        fraction, *rest = self.where
        return "/".join([self.kind, fraction_tag(fraction), *(str(part) for part in rest)])

    @property
    def terms(self) -> list[Term]:
        return [term for part in self.parts for term in part.terms]


def fraction_tag(fraction: float) -> str:
    """'r025' for 0.25, 'r100' for 1.0 (folder and table names)."""
    return f"r{round(fraction * 100):03d}"


def settings_key(settings: dict[str, Any]) -> str:
    """What identifies an SDM's settings (model, train, finetune keys) in the plan: one SDM per (subset, key)."""
    return json.dumps(settings, sort_keys=True, default=str)


def training_steps(config, num_images: int) -> int:
    """Steps a train/finetune/masks run takes at most: max_steps, else max_epochs whole epochs."""
    if config.max_steps:
        return config.max_steps
    return config.max_epochs * math.ceil(num_images / config.batch_size)


def sampled_forwards(sample, trained_steps: int) -> tuple[float, float]:
    """Forward rows per image of a sample config, steps run x (1 + resampling jumps) x (2 where guided), and the
    guided share of its steps."""
    diffusion = sampling_diffusion(sample, TrainedWith(diffusion_steps=trained_steps))
    steps = diffusion.num_timesteps if sample.mode == "noise" else start_step(diffusion, sample.strength) + 1
    jumps = 1 + (sample.resample_steps if sample.mode in PAINTING_MODES else 0)
    guided = guided_share(diffusion, sample.guidance_interval) if sample.s > 1.0 else 0.0
    return steps * jumps * (1.0 + guided), guided


def sampling_terms(count: int, forwards: float, guided: float, batch: int, model: str, side: int,
                   values: dict[str, Any]) -> tuple[Term, ...]:
    """The forward calls of sampling `count` images (or masks) of `forwards` forward rows each, of which the
    `guided` share runs beside its null-label twin. The sampler sends `batch` images per network call, so an
    unguided call has `batch` rows and a guided one 2 x `batch` (the last, smaller batch is counted at the same
    cost per image); a call is timed at its rows, since a CPU's seconds per image change with them."""
    calls = forwards / (1.0 + guided)  # network calls each image takes part in
    rows = max(1, min(batch, count))
    terms = []
    if guided < 1.0:
        terms.append(Term(count * calls * (1.0 - guided) / rows, Rate(model, "forward", rows, side, values)))
    if guided > 0.0:
        terms.append(Term(count * calls * guided / rows, Rate(model, "forward", 2 * rows, side, values)))
    return tuple(terms)


def checks(steps: int, every: int) -> int:
    """Validation checks of a segmenter run: every `every` steps and at the end."""
    if not every:
        return 0
    return steps // every + (1 if steps % every else 0)


@dataclass
class Planner:
    """What the generator kinds plan their units with (generators/), and what they leave for the next: the SDMs
    planned so far and the images each generator of a fraction makes."""

    config: StudyConfig
    num_classes: int
    sizes: SplitSizes
    sdms: dict[tuple[float, str], str] = field(default_factory=dict)  # (subset, settings_key) -> its last unit's id
    # (subset, settings_key without train.max_steps) -> [(max_steps, its sdm-train unit's id)], in plan order
    sdm_trains: dict[tuple[float, str], list[tuple[int, str]]] = field(default_factory=dict)
    made: dict[float, dict[str, tuple[int, str]]] = field(default_factory=dict)  # fraction -> name -> images, unit id
    scorers: dict[float, str] = field(default_factory=dict)  # fraction -> the unit that trains its FreeMask scorer

    @property
    def common(self) -> dict[str, Any]:
        """The keys every SDM and sample config of the study shares (its dataset as the data folder)."""
        return self.config.generator_keys(self.config.data_dir, self.num_classes)

    def segmenter_step(self) -> Rate:
        protocol = self.config.segmenter
        return Rate("segmenter", "train_step", protocol.batch_size, self.config.image_size)

    def segmenter_image(self) -> Rate:
        return Rate("segmenter", "predict_image", 1, self.config.image_size)

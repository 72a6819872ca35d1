"""The study's units of work in the order the run meets them, each with the work it does: the one list that the
run counts for its progress lines (progress.py) and that `--estimate` prices (estimate.py).

A unit is what the study's ledger records: an SDM trained or finetuned, a mask generator trained, a generator
sampled or filtered, a segmenter trained and scored, a label alignment. Its work is a few `Term`s, each a count
of one `Rate` (an SDM's training step, a forward call of the sampler, a segmenter's step or predicted image):
the estimate times each rate on this machine, the progress lines calibrate them on the units already run.
`evaluation/study/run.py` names each unit it runs by the same (kind, where) as its planned twin here, and the tests
check that every unit the study runs is planned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from guided_diffusion.config import config_from_dict
from guided_diffusion.guidance import guided_share
from guided_diffusion.sampling.inpaint import start_step
from guided_diffusion.sampling.mask_selection import TrainedWith
from guided_diffusion.masks.model import POOL_FACTOR
from guided_diffusion.sampling.sample import sampling_diffusion

from .config import StudyConfig


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
    """A unit of the study: its ledger kind, where it sits (what run.py names it by) and its work."""

    kind: str
    where: tuple
    parts: tuple[Part, ...]

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
    jumps = 1 + (sample.resample_steps if sample.mode in ("inpaint", "harmonize") else 0)
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


def plan_units(config: StudyConfig, num_classes: int, sizes: SplitSizes) -> list[PlannedUnit]:
    """Every unit of the study, in the order `study.run_study` runs them: per fraction, each generator (its SDM
    first where this is the SDM's first use, then its mask generator, then its sampling or filtering); then the
    segmenters, the real-only baseline first, each real-only seed followed by its label alignment with every
    generator of the fraction."""
    common = config.generator_keys(config.data_dir, num_classes)
    protocol = config.segmenter
    size = config.image_size
    segmenter_step = Rate("segmenter", "train_step", protocol.batch_size, size)
    segmenter_image = Rate("segmenter", "predict_image", 1, size)
    trained: set[tuple[float, str]] = set()
    units: list[PlannedUnit] = []
    for fraction in config.real_fractions:
        tag = fraction_tag(fraction)
        generated: dict[str, int] = {}
        scored = False
        for name in config.generators_at(fraction):  # sources of filtered generators come first
            generator = config.generators[name]
            if generator.labels == "filtered":
                images = generated.get(generator.source, 0)
                generated[name] = images
                work, terms = f"{images} images segmented", [Term(images, segmenter_image)]
                if not scored:  # one scorer per subset, cached under scorers/
                    scored = True
                    work = f"a scorer of {protocol.steps:,} steps + " + work
                    terms.append(Term(protocol.steps, segmenter_step))
                units.append(PlannedUnit("filter", (fraction, name),
                                         (Part(f"FreeMask filter {name} ({tag})", work, tuple(terms)),)))
                continue
            settings = config.sdm_settings(name) if generator.kind == "sdm" else {}
            model = settings.get("model", {})
            if generator.kind == "sdm":
                trained_at = generator.sdm_fraction if generator.sdm_fraction is not None else fraction
                if (trained_at, settings_key(settings)) not in trained:
                    trained.add((trained_at, settings_key(settings)))
                    units += _sdm_units(common, settings, trained_at, sizes.subsets[trained_at], name)
            values = {**common, **model, **generator.sample_keys}
            if generator.mask_generator is not None:
                values["mask_source"] = "x"
            if generator.kind == "sdm":
                values["model_path"] = "x"
            else:
                values = {k: v for k, v in values.items() if k not in model}
            sample, _ = config_from_dict("sample", values, f"study generators.{name}")
            generated[name] = sample.num_samples
            parts = []
            if generator.mask_generator is not None:
                masks_values = {**config.mask_generator_keys(config.data_dir, num_classes),
                                **generator.mask_generator}
                masks, _ = config_from_dict("masks", masks_values, f"study generators.{name}.mask_generator")
                steps = training_steps(masks, sizes.subsets[fraction])
                units.append(PlannedUnit("masks-train", (fraction, name), (Part(
                    f"mask generator of {name} ({tag})", f"{steps:,} steps of batch {masks.batch_size} at "
                                                         f"{masks.image_size} px",
                    (Term(steps, Rate("masks", "train_step", masks.batch_size, masks.image_size, masks_values)),)),)))
                pool = POOL_FACTOR if sample.balance_args else 1  # candidates to choose among
                guided = 1.0 if sample.mask_guidance > 1.0 else 0.0
                per_mask = sample.mask_steps * (1.0 + guided)
                count = pool * sample.num_samples
                parts.append(Part(f"new masks for {name} ({tag})", f"{count} masks x {per_mask:g} forwards",
                                  sampling_terms(count, per_mask, guided, sample.batch_size, "masks",
                                                 masks.image_size, masks_values)))
            if generator.kind != "sdm":
                parts.append(Part(f"generator {name} ({tag})", f"{sample.num_samples} images, no model"))
            else:
                train_values = {**common, **model, **settings["train"]}
                train, _ = config_from_dict("train", train_values, "study sdm.train")
                forwards, guided = sampled_forwards(sample, train.diffusion_steps)
                parts.append(Part(f"generator {name} ({tag})",
                                  f"{sample.num_samples} images x {forwards:g} forwards at {size} px",
                                  sampling_terms(sample.num_samples, forwards, guided, sample.batch_size, "sdm",
                                                 size, train_values)))
            units.append(PlannedUnit("sample", (fraction, name), tuple(parts)))

        count = checks(protocol.steps, protocol.select_every) * sizes.val + sizes.test
        segmenter = Part(f"segmenters ({tag})",
                         f"{protocol.steps:,} steps of batch {protocol.batch_size} + "
                         f"{checks(protocol.steps, protocol.select_every)} checks on {sizes.val} val images + "
                         f"{sizes.test} test images",
                         (Term(protocol.steps, segmenter_step), Term(count, segmenter_image)))
        for variant in sorted(config.variants_at(fraction), key=lambda v: not v.is_baseline):  # baseline first
            for seed in protocol.seeds:
                units.append(PlannedUnit("segmenter", (fraction, variant.name, seed), (segmenter,)))
                if variant.is_baseline:  # label alignment, a unit per generator
                    for name, images in generated.items():
                        units.append(PlannedUnit("alignment", (fraction, name, seed), (Part(
                            f"label alignment of {name} ({tag})", f"{images} generated images segmented",
                            (Term(images, segmenter_image),)),)))
    return units


def _sdm_units(common: dict[str, Any], settings: dict[str, Any], fraction: float, images: int, name: str
               ) -> list[PlannedUnit]:
    """The training and finetuning of an SDM of `settings` on the subset of `fraction` (first used by `name`)."""
    tag, key, model = fraction_tag(fraction), settings_key(settings), settings.get("model", {})
    train_values = {**common, **model, **settings["train"]}
    train, _ = config_from_dict("train", train_values, "study sdm.train")
    steps = training_steps(train, images)
    crop = f", {train.crop_size} px crops" if train.crop_size else f" at {train.image_size} px"
    units = [PlannedUnit("sdm-train", (fraction, key), (Part(
        f"SDM training ({tag}, as {name})", f"{steps:,} steps of batch {train.batch_size}{crop}",
        (Term(steps, Rate("sdm", "train_step", train.batch_size, train.crop_size or train.image_size,
                          train_values)),)),))]
    if settings.get("finetune") is not None:
        tune, _ = config_from_dict("finetune", {**common, **model, **settings["finetune"], "resume_checkpoint": "x"},
                                   "study sdm.finetune")
        steps = training_steps(tune, images)
        # timed with the train values: the same network, its step at the finetune batch and crop (estimate.py)
        units.append(PlannedUnit("sdm-finetune", (fraction, key), (Part(
            f"SDM finetuning ({tag}, as {name})", f"{steps:,} steps of batch {tune.batch_size}",
            (Term(steps, Rate("sdm", "finetune_step", tune.batch_size, tune.crop_size or tune.image_size,
                              train_values)),)),)))
    return units

"""The low-data study behind `evaluation/experiment.sh`: does synthetic data help when real labels are scarce?

One command runs every stage into one folder (`output_dir`), and a killed study picks up where it stopped:

1. split      a real validation split (`val_fraction` of train/, for model selection only) and, for each
              `real_fractions` value, a seeded subset of the rest (nested: the 25 % subset lies inside the 50 %
              one); each subset is laid out as a dataset folder of links, `data/r025/train/{images,masks}`.
2. generator  for each fraction whose variants use an SDM: `main.py train` then `main.py finetune` on that
              subset only (keys from `sdm.model` + `sdm.train` / `sdm.finetune`).
3. synthetic  each generator's `main.py sample` run on the subset (SDM modes, or `paste`); a generator with a
              `mask_generator` first trains one (`main.py masks`) on the subset's masks and paints its new masks.
4. segmenters every variant x seed at each fraction: the same architecture, steps, batch and schedule; the
              weights of the check with the best mIoU (without background) on the real validation split are
              kept; then scored once on the real test split. The real-only segmenters also score each
              generator's images against the masks they were made for (label alignment).
5. report     report.md, summary.json, results.csv and plots (see report.py).

Resume: every finished unit of work is recorded with a fingerprint of everything that decides its result. A
rerun skips units whose fingerprint is recorded; a changed setting redoes just the units it touches, in new
folders, and never overwrites earlier output. The test split is read in stage 4 for scoring and nowhere else.

One plan: the units are planned before any runs (plan.plan_units, the list `--estimate` prices and the report
reads), and the runner executes that list (run_units): each unit, given the ledger entries of the units it needs,
is run by its executor (generators/ for stages 2-3, this module for stage 4). The same list runs here in one
process, one unit at a time as Slurm jobs (`--slurm`, slurm.py; a job runs `--unit <id>`), or not at all
(`--report-only`, `--list-units`).

Progress: each unit started, finished or found in the ledger prints a line with the time elapsed and an estimate
of the time left (progress.py), with or without --no-progress (which turns off the tqdm bars only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from guided_diffusion.config import PLACING_MODES, config_from_dict
from guided_diffusion.config_io import did_you_mean
from guided_diffusion.data import index_dataset, split_train_val
from guided_diffusion.errors import ConfigError, exit_status
from guided_diffusion.run_folder import atomic_write, write_json

from ..contrast import ImageSetLook, image_set_look
from ..image_sets import (IGNORE_INDEX, ImageSet, check_label_keys, class_names, concatenate, index_sample_folder,
                          link_subset, load_pairs, load_sample_folder, resolve_num_classes, training_set)
from ..segmenter.model import SegmenterSpec, TrainSettings, build_segmenter
from ..segmenter.run import Scoring, SegmenterRun, score, train_and_test
from ..segmenter.settings import ScorerSettings
from .config import StudyConfig, Variant, load_beside, load_study
from .context import Ledger, Split, Study, StudyLock, fingerprint
from .jobs import check_jobs
from .plan import plan_units
from .units import PlannedUnit, SplitSizes, fraction_tag
from .progress import UnitProgress

if TYPE_CHECKING:
    from .report import Beside

PROG = "evaluation/experiment.sh"


# -------------------------------------------------------------------------------------------------------------
# 1. split


def make_split(config: StudyConfig, num_classes: int) -> Split:
    index = index_dataset(config.data_dir, config.dataset_mode, num_classes, require_test=True,
                          ignore_value=config.ignore_index)
    pool, val = split_train_val(index.train, config.val_fraction, config.seed)
    order = np.random.default_rng([config.seed, 4242]).permutation(len(pool))
    subsets = {}
    for fraction in config.real_fractions:
        count = max(2, round(fraction * len(pool)))
        subsets[fraction] = sorted((pool[i] for i in order[:count]), key=lambda p: p.stem)
    return Split(val, subsets, index.test)


def check_backgrounds_exist(config: StudyConfig, split: Split) -> None:
    """The placing modes (paste, inpaint, harmonize, blend) put defects onto defect-free images of the subset: refuse a
    study whose subset has none, before any work, unless the generator names its own background_dir."""
    from guided_diffusion.sampling.inpaint import defect_free_pairs

    for fraction, pairs in split.subsets.items():
        free = None
        for name in config.generators_at(fraction):
            generator = config.generators[name]
            mode = generator.sample_keys.get("mode", "noise")
            if mode not in PLACING_MODES or generator.sample.get("background_dir"):
                continue
            free = defect_free_pairs(pairs, config.dataset_mode) if free is None else free
            if not free:
                raise ConfigError(f"key 'generators.{name}': mode '{mode}' puts defects onto defect-free images, "
                                  f"but none of the {len(pairs)} images of the {100 * fraction:g} % subset of "
                                  f"{config.data_dir} has an all-background mask; remove this generator (and its "
                                  "variants) or set its sample.background_dir to a folder of defect-free images; "
                                  "configs/experiment_magnetic_tile_from_masks.json is a study that needs none")


# -------------------------------------------------------------------------------------------------------------
# 4. segmenters


def ignored_label(study: Study) -> int | None:
    """The label value of ignored pixels in the study's masks: key ignore_index, else 255 (what the filter
    writes) while 255 is no class id."""
    if study.config.ignore_index is not None:
        return study.config.ignore_index
    return IGNORE_INDEX if study.num_classes <= IGNORE_INDEX else None


def load_generated(study: Study, name: str, run_dir: str) -> ImageSet:
    """A generator's pairs at the study's size; filtered labels mark ignored pixels with ignored_label()."""
    filtered = study.config.generators[name].labels == "filtered"
    folder = index_sample_folder(run_dir, study.num_classes, "filtered" if filtered else "raw")
    pairs = load_sample_folder(folder, study.num_classes, study.config.image_size, study.config.resize_mode)
    if filtered and ignored_label(study) not in (IGNORE_INDEX, None):
        pairs.masks[pairs.masks == IGNORE_INDEX] = ignored_label(study)
    return dataclasses.replace(pairs, name=name)


def _settings(study: Study, variant: Variant, seed: int) -> TrainSettings:
    p = study.config.segmenter
    return TrainSettings(p.steps, p.batch_size, p.lr, p.weight_decay, variant.augment, seed,
                         ignored_label(study), study.bf16, p.select_every, variant.synthetic_ratio,
                         variant.synthetic_weight, variant.real_finetune_share)


def _spec(study: Study) -> SegmenterSpec:
    p = study.config.segmenter
    return SegmenterSpec(p.architecture, study.num_classes, p.encoder, p.encoder_weights)


def _scoring(study: Study) -> Scoring:
    """Validation, test and label alignment alike: the ignored label, the background class, bf16 as trained."""
    return Scoring(study.num_classes, ignored_label(study), study.config.background_class, study.bf16)


def variant_training_set(variant: Variant, real: ImageSet, synthetic: dict[str, ImageSet], seed: int
                         ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A variant's images and masks (uint8), with its numbers of real and synthetic pairs: the real pairs when it
    has them, then its generators' images, at most max_synthetic of them (a draw seeded by the seed)."""
    parts: list[tuple[ImageSet, np.ndarray | None]] = [(real, None)] if variant.real else []
    num_fake = 0
    if variant.synthetic:
        pool = concatenate([synthetic[name] for name in variant.synthetic], "synthetic")
        keep = None
        if variant.max_synthetic and len(pool) > variant.max_synthetic:
            keep = np.sort(np.random.default_rng([seed, 77]).permutation(len(pool))[:variant.max_synthetic])
        parts.append((pool, keep))
        num_fake = len(pool) if keep is None else len(keep)
    images, masks = training_set(parts)
    return images, masks.astype(np.uint8), len(real) if variant.real else 0, num_fake


def weights_path(study: Study, key: str) -> Path:
    """Where a real-only segmenter's weights are kept (label alignment of generators added later reads them)."""
    return study.root / "segmenters" / f"{key}.pt"


def save_weights(model, path: Path) -> None:
    """A segmenter's weights, written whole or not at all (a kill leaves no half file)."""
    with atomic_write(path) as handle:
        torch.save(model.state_dict(), handle)


def train_and_score(study: Study, fraction: float, variant: Variant, seed: int, real: ImageSet,
                    synthetic: dict[str, ImageSet], val: ImageSet, test: ImageSet, key: str) -> dict[str, Any]:
    """Train one segmenter of a variant and seed, keep the best validation check, score it on test. A
    real-only segmenter's weights are saved for label alignment."""
    run, row = _train(study, fraction, variant, seed, real, synthetic, val, test)
    metrics = run.test
    if variant.is_baseline:
        save_weights(run.model, weights_path(study, key))
    study.log(f"  {fraction_tag(fraction)} {variant.name} seed {seed}: test mIoU {metrics.miou:.4f}, without "
              f"background {metrics.miou_no_bg:.4f} (step {row['selected_step']} chosen on val)")
    return {**row, **metrics.row(study.class_names)}


def _train(study: Study, fraction: float, variant: Variant, seed: int, real: ImageSet,
           synthetic: dict[str, ImageSet], val: ImageSet, test: ImageSet | None = None
           ) -> tuple[SegmenterRun, dict[str, Any]]:
    """The segmenter run of a variant and seed (segmenter/run.py: weights chosen on `val`, scored on `test` when
    given) and its row: what it trained on, the step chosen and its validation score, the final loss."""
    images, masks, num_real, num_fake = variant_training_set(variant, real, synthetic, seed)
    run = train_and_test(images, masks, _spec(study), _settings(study, variant, seed), _scoring(study),
                         study.device, validation=val, test=test, synthetic=np.arange(len(images)) >= num_real,
                         desc=f"{fraction_tag(fraction)} {variant.name} seed {seed}", progress=study.progress)
    return run, {"fraction": fraction, "variant": variant.name, "seed": seed, "real_images": num_real,
                 "synthetic_images": num_fake, "selected_step": run.selection.best_step,
                 "val_miou_no_bg": run.selection.best_score, "final_loss": run.final_loss}


def align(study: Study, fraction: float, variant: Variant, seed: int, real: ImageSet, val: ImageSet,
          key: str, generated: ImageSet) -> dict[str, Any]:
    """Label alignment of one generator: the real-only segmenter (weights saved by its unit, or trained again,
    which is deterministic, when they are gone, and saved for the next generator) segments the generator's images
    against their masks."""
    path = weights_path(study, key)
    if path.is_file():
        model = build_segmenter(dataclasses.replace(_spec(study), encoder_weights=None))  # the file holds them all
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.to(study.device).eval()
    else:
        study.log(f"  {path} is gone: training the real-only segmenter of seed {seed} again")
        model = _train(study, fraction, variant, seed, real, {}, val)[0].model
        save_weights(model, path)
    return score(model, generated.images, generated.masks, _scoring(study), study.device).scalars()


# -------------------------------------------------------------------------------------------------------------
# the whole study


def check_study(config: StudyConfig, num_classes: int) -> None:
    """Checks that need the dataset: class ids of background_class / ignore_index, and every SDM and sample config
    (built here once, so a bad key stops the study before any work)."""
    check_label_keys(config.background_class, config.ignore_index, num_classes)
    common = config.generator_keys(config.data_dir, num_classes)
    checked: set[str] = set()
    for name, generator in config.generators.items():
        if generator.labels == "filtered":
            if "ignore_index" in common:
                raise ConfigError(f"key 'generators.{name}': FreeMask filtering does not handle void pixels yet "
                                  f"(ignore_index {config.ignore_index}); leave out the filtered generator")
            continue  # its filter settings were checked where the file was read
        sdm = config.sdm_settings(name) if generator.kind == "sdm" else {}
        model = sdm.get("model", {})
        where = f"study generators.{name}.sdm" if generator.sdm else "study sdm"
        if generator.kind == "sdm" and fingerprint(sdm) not in checked:
            checked.add(fingerprint(sdm))
            config_from_dict("train", {**common, **model, **sdm["train"]}, f"{where}.train")
            if sdm.get("finetune") is not None:
                config_from_dict("finetune", {**common, **model, **sdm["finetune"], "resume_checkpoint": "x"},
                                 f"{where}.finetune")
        masks = {} if generator.mask_generator is None else {"mask_source": "x"}
        sample, _ = config_from_dict("sample", {**model, **common, **generator.sample_keys, "model_path": "x",
                                                **masks}, f"study generators.{name}")
        ScorerSettings.of_sample_config(sample, f"study generators.{name}")  # hardness_args.scorer: evaluation's keys
        if generator.mask_generator is not None:
            config_from_dict("masks", {**config.mask_generator_keys(config.data_dir, num_classes),
                                       **generator.mask_generator}, f"study generators.{name}.mask_generator")


def print_flushed(line: str) -> None:
    """The study's log: stdout, each line flushed as it is written (a log file shows where the study is)."""
    print(line, flush=True)


class StudyData:
    """The study's image sets, loaded when a unit first needs them: the real validation and test splits, and the
    real subset and generated sets of one fraction at a time (those of the fraction before are let go)."""

    def __init__(self, study: Study):
        self.study = study
        self.load_seconds = 0.0  # loading val and test
        self._val: ImageSet | None = None
        self._test: ImageSet | None = None
        self.fraction: float | None = None
        self.sets: dict[str, ImageSet] = {}  # "real" and the generated sets (by run folder) of self.fraction

    def _real_split(self, name: str) -> ImageSet:
        config = self.study.config
        started = time.perf_counter()
        pairs = load_pairs(getattr(self.study.split, name), config.dataset_mode, config.image_size,
                           config.resize_mode, name)
        self.load_seconds += time.perf_counter() - started
        return pairs

    @property
    def val(self) -> ImageSet:
        if self._val is None:
            self._val = self._real_split("val")
        return self._val

    @property
    def test(self) -> ImageSet:
        if self._test is None:
            self._test = self._real_split("test")
        return self._test

    def _at(self, fraction: float) -> None:
        if fraction != self.fraction:
            self.fraction, self.sets = fraction, {}

    def real(self, fraction: float) -> ImageSet:
        self._at(fraction)
        if "real" not in self.sets:
            config = self.study.config
            self.sets["real"] = load_pairs(self.study.split.subsets[fraction], config.dataset_mode,
                                           config.image_size, config.resize_mode, fraction_tag(fraction))
        return self.sets["real"]

    def generated(self, fraction: float, name: str, entry: dict[str, Any]) -> ImageSet:
        self._at(fraction)
        key = f"{name}:{entry['run_dir']}"
        if key not in self.sets:
            self.sets[key] = load_generated(self.study, name, entry["run_dir"])
        return self.sets[key]


class SegmenterUnits:
    """The executors of the segmenter and label-alignment units, over the study's image sets."""

    def __init__(self, study: Study, data: StudyData):
        self.study, self.data = study, data
        keys = study.config.segmenter.fingerprint_keys()
        self.protocol_key = self.protocol(keys)
        # A pinned precision also takes the units done under "auto" that ran in it (the ledger records each unit's
        # precision): pinning it to keep a study's pairs in one precision on a machine of another kind redoes
        # nothing already done in that precision.
        self.auto_protocol_key = self.protocol({**keys, "precision": "auto"}) if keys["precision"] != "auto" else None

    def protocol(self, segmenter_keys: dict[str, Any]) -> str:
        """The key of the segmenter protocol and of the study's split; the seed list is left out (each unit's key
        has its seed): adding a seed redoes nothing else."""
        config, split = self.study.config, self.study.split
        return fingerprint(segmenter_keys, config.image_size, config.resize_mode, config.val_fraction, config.seed,
                           config.background_class, config.ignore_index, [p.stem for p in split.val],
                           [p.stem for p in split.test])

    def variant(self, name: str) -> Variant:
        return next(v for v in self.study.config.variants if v.name == name)

    def segmenter(self, study: Study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        fraction, name, seed = unit.where
        variant = self.variant(name)
        sources = {generator: needs[generator]["fingerprint"] for generator in variant.synthetic}

        def key_of(protocol_key: str) -> str:
            return fingerprint("segmenter", protocol_key, study.subset_key(fraction), variant.recipe(), sources, seed)
        key = key_of(self.protocol_key)
        if self.auto_protocol_key is not None and study.ledger.get("segmenter", key) is None:
            under_auto = study.ledger.get("segmenter", key_of(self.auto_protocol_key))
            if under_auto is not None and under_auto.get("precision") == study.config.segmenter.precision:
                key = under_auto["fingerprint"]

        def work() -> dict[str, Any]:
            synthetic = {generator: self.data.generated(fraction, generator, needs[generator])
                         for generator in variant.synthetic}
            return train_and_score(study, fraction, variant, seed, self.data.real(fraction), synthetic,
                                   self.data.val, self.data.test, key)

        return study.unit(unit, key, f"segmenter {fraction_tag(fraction)} {variant.name} seed {seed}", work)

    def alignment(self, study: Study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        fraction, name, seed = unit.where
        segmenter, generated = needs["segmenter"], needs["generated"]
        variant = next(v for v in study.config.variants_at(fraction) if v.is_baseline)  # the real-only one
        key = fingerprint("alignment", segmenter["fingerprint"], generated["fingerprint"])
        return study.unit(unit, key, f"label alignment of {name} ({fraction_tag(fraction)}, seed {seed})",
                          lambda: align(study, fraction, variant, seed, self.data.real(fraction), self.data.val,
                                        segmenter["fingerprint"], self.data.generated(fraction, name, generated)))


def run_units(study: Study, units: list[PlannedUnit], executors: dict[str, Callable[..., dict[str, Any] | None]]
              ) -> dict[str, dict[str, Any] | None]:
    """Execute the plan in order: each unit, given the ledger entries of the units it needs, is run, or found in
    the ledger (resume), or, where this run may not run it (report-only, or another unit's Slurm job), read from
    the ledger. A unit whose needs are not done is left (None), and so are the units after it that need it."""
    entries: dict[str, dict[str, Any] | None] = {}
    for unit in units:
        needs = {role: entries.get(needed) for role, needed in unit.needs}
        if any(entry is None for entry in needs.values()):
            entries[unit.id] = None
            continue
        entries[unit.id] = executors[unit.kind](study, unit, needs)
        if study.only == unit.id:
            break
    return entries


def report_inputs(units: list[PlannedUnit], entries: dict[str, dict[str, Any] | None], config: StudyConfig
                  ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """What the report reads, from the ledger entries of the plan's units: the segmenter rows in plan order, each
    real-only one with the label alignment of its seed ({generator: scores}); and each generator's entry by
    '<fraction tag>/<name>'."""
    aligned: dict[tuple, dict[str, Any]] = {}
    generator_runs: dict[str, dict[str, Any]] = {}
    for unit in units:
        entry = entries.get(unit.id)
        if entry is None:
            continue
        if unit.kind == "alignment":
            fraction, name, seed = unit.where
            aligned.setdefault((fraction, seed), {})[name] = {
                k: v for k, v in entry.items() if k not in ("kind", "fingerprint", "seconds")}
        elif unit.kind in ("sample", "filter"):
            generator_runs[f"{fraction_tag(unit.where[0])}/{unit.where[1]}"] = entry
    baselines = {v.name for v in config.variants if v.is_baseline}
    rows = []
    for unit in units:
        entry = entries.get(unit.id)
        if unit.kind != "segmenter" or entry is None:
            continue
        fraction, name, seed = unit.where
        rows.append({**entry, "alignment": aligned.get((fraction, seed), {})} if name in baselines else entry)
    return rows, generator_runs


def set_looks(study: Study, data: StudyData, generator_runs: dict[str, dict[str, Any]]
              ) -> dict[float, dict[str, ImageSetLook]]:
    """How each set draws each class, per fraction with generated sets (the report's "Defect contrast" and
    "Defect roughness")."""
    looks: dict[float, dict[str, ImageSetLook]] = {}
    for fraction in study.config.real_fractions:
        tag = fraction_tag(fraction)
        runs = {key.split("/", 1)[1]: entry for key, entry in generator_runs.items() if key.split("/")[0] == tag}
        if not runs:
            continue
        sets = {"real": data.real(fraction),
                **{name: data.generated(fraction, name, entry) for name, entry in runs.items()}}
        looks[fraction] = {name: image_set_look(images.images, images.masks, list(range(study.num_classes)),
                                                study.config.background_class, ignored_label(study))
                           for name, images in sets.items()}
    return looks


def open_study(config: StudyConfig, log: Callable[[str], None], progress: bool, report_only: bool,
               only: str | None, started: float, checks_weights: bool = False) -> tuple[Study, list[PlannedUnit]]:
    """Check the config against the dataset, make the split and the plan; the Study that runs it (with
    `report_only`, one that runs nothing: its segmenter's weights are fetched only with `checks_weights`)."""
    from guided_diffusion.model_setup import bf16_autocast, processor_name, select_device

    num_classes = resolve_num_classes(config)
    check_study(config, num_classes)
    names = class_names(config.data_dir, num_classes)
    device = select_device(config.device)
    wanted = config.segmenter.precision
    bf16 = bf16_autocast(wanted, device)  # the SDM's rule: "auto" = bf16 where it is native (measured faster)
    if wanted == "bf16" and not bf16:
        raise ConfigError(f"key 'segmenter.precision' is bf16 but this {device.type} has no native bf16; use auto")
    split = make_split(config, num_classes)  # the dataset is checked whole here, before anything is written
    check_backgrounds_exist(config, split)
    units = plan_units(config, num_classes, SplitSizes.of(split))
    if only is not None and only not in {unit.id for unit in units}:
        raise ConfigError(f"--unit {only}: the study has no such unit{did_you_mean(only, [u.id for u in units])}; "
                          "--list-units lists them")
    if not report_only or checks_weights:  # encoder weights that cannot be had (offline, a bad file) stop the
        segmenter = config.segmenter       # study (or its submission as Slurm jobs) before any work
        build_segmenter(SegmenterSpec(segmenter.architecture, num_classes, segmenter.encoder,
                                      segmenter.encoder_weights))
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    lock = StudyLock(root) if not report_only and only is None else None
    try:
        ledger = Ledger(root / "ledger.jsonl")
        spelled = ledger.spelling_of(root)
        if spelled != root:
            log(f"study folder {root} is spelled {spelled} in its ledger: using that spelling, which its units' "
                f"fingerprints hold")
            root = spelled
        planned = units if only is None else [unit for unit in units if unit.id == only]
        study = Study(config, root, num_classes, names, ledger, device, bf16, log,
                      UnitProgress(planned, log, started), split, processor_name(device), progress, report_only,
                      only, lock=lock)
        check_same_split(study)
        for fraction, pairs in split.subsets.items():
            link_subset(pairs, study.subset_dir(fraction), config.data_dir)  # the SDM never sees val or test
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return study, units


def check_same_split(study: Study) -> None:
    """Refuse a study folder whose subsets hold other images than this config draws: it belongs to a study of
    another split (seed, val_fraction, data_dir or the dataset changed), and relinking its subsets would make its
    own later SDMs and samples read this config's images. A subset only partly linked (by another process of
    the same study, its Slurm jobs, meanwhile) is no conflict."""
    for fraction, pairs in study.split.subsets.items():
        folder = study.subset_dir(fraction) / "train" / "images"
        have = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
        want = {pair.image.name for pair in pairs}
        if have - want:
            raise ConfigError(f"output_dir {study.root}: its {fraction_tag(fraction)} subset holds "
                              f"{len(have - want)} images this config does not draw (of {len(have)}): the folder "
                              f"belongs to a study of another split (seed, val_fraction, data_dir or the dataset "
                              f"changed); give another output_dir, or the config of that study")


def execute(study: Study, units: list[PlannedUnit]) -> tuple[dict[str, dict[str, Any] | None], StudyData]:
    """Run the plan's units as far as this run may (Study.runs); their ledger entries by unit id."""
    from .generators import EXECUTORS

    data = StudyData(study)
    segmenters = SegmenterUnits(study, data)
    return run_units(study, units, {**EXECUTORS, "segmenter": segmenters.segmenter,
                                    "alignment": segmenters.alignment}), data


def run_study(config: StudyConfig, values: dict[str, Any], command: str = "",
              log: Callable[[str], None] = print_flushed,
              progress: bool = True, report_only: bool = False, only: str | None = None) -> Path:
    """Run the study's plan (or, with `report_only`, run nothing and report the units the ledger holds; with
    `only`, run that one unit, whose needs the ledger holds, and write no report: a Slurm job)."""
    started = time.perf_counter()
    study, units = open_study(config, log, progress, report_only, only, started)
    try:
        if only is None:
            announce(study, values, command)
        entries, data = execute(study, units)
        if only is not None:
            if entries.get(only) is None:
                raise ConfigError(f"--unit {only}: the units it needs are not all in the ledger of {study.root}")
            return study.root
        if not report_only:
            study.unit_progress.close()
        report(study, units, entries, data, command, started)
        return study.root
    finally:
        study.release()


def announce(study: Study, values: dict[str, Any], command: str) -> None:
    """The first lines of a run of the whole study (or of its report), its config beside the report and its
    split.json."""
    root, split = study.root, study.split
    done = len(study.ledger.entries)
    study.log(f"study folder: {root} ({f'resuming: {done} units done' if done else 'new'})"
              + ("; report only: nothing is run" if study.report_only else ""))
    if not study.report_only:
        write_config(study, values, command)
    write_json(root / "split.json", {"val": [p.stem for p in split.val],
                                     **{fraction_tag(f): [p.stem for p in s] for f, s in split.subsets.items()}})
    study.log(f"real data: {len(split.val)} validation, "
              + ", ".join(f"{len(s)} at {fraction_tag(f)}" for f, s in split.subsets.items())
              + f", {len(split.test)} test images (test used for scoring only)")


def report(study: Study, units: list[PlannedUnit], entries: dict[str, dict[str, Any] | None], data: StudyData,
           command: str, started: float) -> None:
    """report.md, summary.json, results.csv and the plots of the units the ledger holds."""
    from .report import write_report

    rows, generator_runs = report_inputs(units, entries, study.config)
    looks = set_looks(study, data, generator_runs)
    write_report(study, rows, generator_runs, study.split, command, time.perf_counter() - started,
                 data.load_seconds, looks, beside_results(study.config))
    study.log(f"report: {study.report_root / 'report.md'}")


def run_study_jobs(config: StudyConfig, values: dict[str, Any], command: str, study_argv: list[str], jobs: int,
                   log: Callable[[str], None] = print_flushed) -> int:
    """`--jobs N`: the units not done as N processes side by side (jobs.py), then the report; the exit status
    (1 when a unit failed: one line names it, its error and its log)."""
    started = time.perf_counter()
    study, units = open_study(config, log, False, False, None, started)
    try:
        return _run_jobs(study, units, values, command, study_argv, jobs, started)
    finally:
        study.release()


def _run_jobs(study: Study, units: list[PlannedUnit], values: dict[str, Any], command: str, study_argv: list[str],
              jobs: int, started: float) -> int:
    import signal

    from .jobs import failure_line, launcher, raise_on_sigterm, run_jobs, threads_per_job, unit_log

    log = study.log
    announce(study, values, command)
    watcher = dataclasses.replace(study, report_only=True, used=set())  # reads the ledger, runs nothing
    threads = threads_per_job(jobs, torch.get_num_threads())
    log(f"{jobs} jobs side by side, {threads} CPU thread{'s' if threads > 1 else ''} each; each unit's output in "
        f"{study.root / 'logs'}")

    def read_ledger() -> tuple[dict[str, dict[str, Any] | None], StudyData]:
        """The plan's entries in the ledger as the jobs have written it so far."""
        watcher.ledger = Ledger(study.root / "ledger.jsonl")
        return execute(watcher, units)

    def read_done() -> set[str]:
        return {unit_id for unit_id, entry in read_ledger()[0].items() if entry is not None}

    logs = study.root / "logs"
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        failed = run_jobs(units, jobs, read_done, launcher(study_argv, logs, threads), log,
                          lambda unit_id: unit_log(logs, unit_id))
    finally:
        signal.signal(signal.SIGTERM, previous)
    for unit_id in failed:
        print(failure_line(unit_id, unit_log(logs, unit_id)), file=sys.stderr)
    if failed:
        return 1
    entries, data = read_ledger()
    left = [unit.id for unit in units if entries.get(unit.id) is None]
    if left:  # a bug: every unit whose needs were done was run
        print(f"error: {len(left)} units of the plan are not in the ledger after their jobs: {', '.join(left[:3])}",
              file=sys.stderr)
        return 1
    report(watcher, units, entries, data, command, started)
    return 0


def beside_results(config: StudyConfig) -> list[Beside]:
    """The results of each `beside` config, read (report only, nothing run) from this study's folder."""
    from .report import Beside, summarize

    results = []
    for path, other in zip(config.beside, load_beside(config)):
        study, units = open_study(other, lambda *_: None, False, True, None, time.perf_counter())
        entries, _ = execute(study, units)
        rows, _ = report_inputs(units, entries, other)
        results.append(Beside(path, other, summarize(study, rows), study.bf16))
    return results


def write_config(study: Study, values: dict[str, Any], command: str) -> None:
    """The config a run was given, beside its report (`report_dir`)."""
    study.report_root.mkdir(parents=True, exist_ok=True)
    write_json(study.report_root / f"config{'_quick' if study.config.quick else ''}.json",
               {**values, "_command": command})


def list_units(config: StudyConfig, log: Callable[[str], None]) -> None:
    """`--list-units`: each unit of the plan in run order, whether the ledger holds it, and the units it needs."""
    study, units = open_study(config, lambda *_: None, False, True, None, time.perf_counter())
    entries, _ = execute(study, units)
    for unit in units:
        state = "done" if entries.get(unit.id) is not None else "to do"
        needs = ", ".join(needed for _, needed in unit.needs)
        log(f"{unit.id}  [{state}]" + (f"  needs {needs}" if needs else ""))


def submit(config: StudyConfig, values: dict[str, Any], command: str, study_argv: list[str],
           sbatch_args: list[str], kind_args: dict[str, list[str]], wait: bool,
           log: Callable[[str], None] = print_flushed) -> None:
    """`--slurm`: the units not done as Slurm jobs (slurm.py); with `wait`, return once they all ended."""
    from .slurm import submit_study, wait_for

    study, units = open_study(config, log, False, True, None, time.perf_counter(), checks_weights=True)
    entries, _ = execute(study, units)
    write_config(study, values, command)
    jobs = submit_study(study.root, units, entries, study_argv, sbatch_args, kind_args, log)
    if wait:
        wait_for(list(jobs.values()))


# -------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The low-data study: train the SDM on a fraction of the real images, generate every synthetic "
                    "variant, train segmenters on each over paired seeds, and write report.md + summary.json. "
                    "A killed study resumes where it stopped.",
        epilog=f"Example: {PROG} -c configs/experiment_magnetic_tile.json --quick")
    parser.add_argument("-c", "--config", required=True, help="the study's JSON config")
    parser.add_argument("--quick", action="store_true",
                        help="the same study at toy size (32 px, tiny SDM, 2 seeds, few steps) into <output_dir>_quick")
    parser.add_argument("--output-dir", help="the study folder (default: the config's output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key (value read as JSON; dots reach into objects, e.g. segmenter.steps=500)")
    parser.add_argument("--dry-run", action="store_true", help="check the config, print it resolved and exit")
    parser.add_argument("--estimate", action="store_true",
                        help="check the config, time a few steps of each of its models on this machine, print the "
                             "study's estimated wall time by stage and exit (writes nothing; about a minute); "
                             "with --jobs N, timed with the threads a job gets and laid out N units at a time")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write report.md and summary.json from the units finished so far")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (for log files); the one-line progress of each unit, with the time "
                             "elapsed and left, stays")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="run N units side by side on this machine, each a process of its own with 1/N of the "
                             "CPU threads, once the units it needs are done (default 1: one after another)")
    parser.add_argument("--list-units", action="store_true",
                        help="print the plan: each unit in run order, done or to do, and the units it needs; run "
                             "nothing")
    cluster = parser.add_argument_group("Slurm (docs/scale_out.md)")
    cluster.add_argument("--slurm", action="store_true",
                         help="submit each unit not done as a Slurm job (sbatch), after the jobs of the units it "
                              "needs, and a report job after them all; rerun to resubmit only what is unfinished")
    cluster.add_argument("--sbatch-args", default="", metavar="ARGS",
                         help="sbatch arguments for every job, e.g. \"--partition=cpu --time=2:00:00\"")
    cluster.add_argument("--sbatch-kind", action="append", default=[], metavar="KIND=ARGS",
                         help="sbatch arguments for the jobs of one unit kind, after --sbatch-args, e.g. "
                              "sdm-train=\"--gres=gpu:1\" (kinds: sdm-train, sdm-finetune, masks-train, sample, "
                              "filter, segmenter, alignment)")
    cluster.add_argument("--wait", action="store_true", help="with --slurm: return once every job has ended")
    cluster.add_argument("--unit", metavar="ID", help="run this one unit of the plan (what a Slurm job runs); the "
                                                      "units it needs must be done")
    return parser.parse_args(glued(argv or [], "--sbatch-args"))


def glued(argv: list[str], option: str) -> list[str]:
    """`option VALUE` as `option=VALUE`: argparse takes a lone value such as "--cpus-per-task=1" for an option."""
    out: list[str] = []
    rest = iter(argv)
    for arg in rest:
        value = next(rest, None) if arg == option else None
        out.append(arg if value is None else f"{option}={value}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def action() -> int | None:
        modes = [name for name, on in (("--slurm", args.slurm), ("--unit", args.unit),
                                       ("--report-only", args.report_only), ("--list-units", args.list_units),
                                       ("--estimate", args.estimate), ("--dry-run", args.dry_run)) if on]
        if len(modes) > 1:
            raise ConfigError(f"{' and '.join(modes)} do not go together: give one of them")
        if (args.wait or args.sbatch_args or args.sbatch_kind) and not args.slurm:
            raise ConfigError("--wait, --sbatch-args and --sbatch-kind only apply with --slurm")
        check_jobs(args.jobs, [mode for mode in modes if mode != "--estimate"])
        config, values = load_study(args.config, args.overrides, args.quick, args.output_dir)
        if args.dry_run:
            check_study(config, resolve_num_classes(config))
            print(json.dumps(dataclasses.asdict(config), indent=2, default=str))
            return
        if args.estimate:
            from .estimate import estimate_study  # noqa: PLC0415 - only --estimate needs it

            num_classes = resolve_num_classes(config)
            check_study(config, num_classes)
            done = len(Ledger(Path(config.output_dir) / "ledger.jsonl").entries)
            if done:
                print(f"{config.output_dir}: {done} units are already in its ledger; a rerun skips them, the "
                      "estimate below counts the whole study")
            print(estimate_study(config, num_classes, make_split(config, num_classes), print, args.jobs or 1))
            return
        if args.list_units:
            list_units(config, print_flushed)
            return
        study_argv = ["-c", args.config, *(["--quick"] if args.quick else []),
                      *(["--output-dir", args.output_dir] if args.output_dir else []),
                      *[part for override in args.overrides for part in ("--set", override)]]
        if args.slurm:
            from .slurm import parse_kind_args  # noqa: PLC0415 - only --slurm needs it

            submit(config, values, shlex.join([PROG, *argv]), study_argv, shlex.split(args.sbatch_args),
                   parse_kind_args(args.sbatch_kind), args.wait)
            return None
        if args.jobs is not None and args.jobs > 1:
            return run_study_jobs(config, values, shlex.join([PROG, *argv]), study_argv, args.jobs)
        run_study(config, values, shlex.join([PROG, *argv]), progress=not args.no_progress,
                  report_only=args.report_only, only=args.unit)
        return None

    with no_progress_bars(args.no_progress):
        return exit_status(action)


@contextlib.contextmanager
def no_progress_bars(on: bool) -> Iterator[None]:
    """With `on` (--no-progress), TQDM_DISABLE=1 while the study runs: the bars that pass tqdm a `disable=` of their
    own read it when they start, and the processes the study starts inherit it (tqdm itself reads it at import, so
    experiment.sh sets it before Python starts). Afterwards the variable is as it was: a caller of `main` in the same
    process, a test for one, keeps its bars."""
    before = os.environ.get("TQDM_DISABLE")
    if on:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


if __name__ == "__main__":
    sys.exit(main())

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

Progress: the units are planned before any runs (plan.plan_units, the list `--estimate` prices), and each
unit started, finished or found in the ledger prints a line with the time elapsed and an estimate of the time
left (progress.py), with or without --no-progress (which turns off the tqdm bars only).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guided_diffusion.config import PLACING_MODES, config_from_dict
from guided_diffusion.data import Pair, index_dataset, split_train_val
from guided_diffusion.errors import ConfigError, exit_status
from guided_diffusion.run_folder import atomic_write, write_json

from ..contrast import ImageSetLook, image_set_look
from ..image_sets import (IGNORE_INDEX, ImageSet, check_label_keys, class_names, concatenate, index_sample_folder,
                          link_subset, load_pairs, load_sample_folder, resolve_num_classes, training_set)
from ..segmenter.model import SegmenterSpec, TrainSettings, build_segmenter
from ..segmenter.run import Scoring, SegmenterRun, score, train_and_test
from ..segmenter.settings import ScorerSettings
from .config import StudyConfig, Variant, load_study
from .context import Ledger, Split, Study
from .plan import SplitSizes, fraction_tag, plan_units, settings_key
from .progress import UnitProgress

PROG = "evaluation/experiment.sh"


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able values: what decides a unit of work's result."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


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
    """Paste, inpaint and harmonize put defects onto defect-free images (all-background masks) of the subset: refuse a
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
                                  "variants) or set its sample.background_dir to a folder of defect-free images")


def lay_out_subset(study: Study, fraction: float, pairs: list[Pair]) -> Path:
    """The subset as a dataset folder of symbolic links (train/ only; the SDM never sees val or test)."""
    return link_subset(pairs, study.root / "data" / fraction_tag(fraction), study.config.data_dir)


# -------------------------------------------------------------------------------------------------------------
# 2.-3. generators and their samples


def precision_of(wanted: str, study: Study) -> str:
    """What a stage's `precision` key resolved to on the study's device: "bf16" (autocast) or "fp32"."""
    from guided_diffusion.model_setup import bf16_autocast

    return "bf16" if bf16_autocast(wanted, study.device) else "fp32"


def with_best_epoch_rule(values: dict[str, Any]) -> dict[str, Any]:
    """An SDM unit's values as its fingerprint sees them: ISDM's best-epoch rule (best_by "epoch_loss", the only
    rule before the key existed) leaves the key out, so SDMs trained by it keep their fingerprints; any other rule,
    the default "fixed_batch" included, is written in, so a study trained before the default changed trains its
    SDM again instead of reusing one whose best.pt was chosen by the old rule."""
    rule = values.get("best_by", "fixed_batch")
    rest = {k: v for k, v in values.items() if k != "best_by"}
    return rest if rule == "epoch_loss" else {**rest, "best_by": rule}


def train_generator(study: Study, fraction: float, data_dir: Path, subset_key: str, sdm: dict[str, Any]
                    ) -> Path | None:
    """Train (and finetune) an SDM of settings `sdm` (model, train, finetune keys) on the subset; returns the run
    folder to sample from (None: not trained yet in a report-only run)."""
    common = {**study.config.generator_keys(str(data_dir), study.num_classes), **sdm.get("model", {})}
    train_values = {**common, **sdm["train"]}
    key = fingerprint("sdm-train", with_best_epoch_rule(train_values), subset_key)
    root = study.root / "generator" / fraction_tag(fraction) / key

    def train(action: str, values: dict[str, Any]) -> dict[str, Any]:
        from guided_diffusion.train import run_training

        config, notes = config_from_dict(action, {**values, "root_log_dir": str(root), "auto_resume": True},
                                         f"study sdm.{action}")
        for note in notes:
            study.log(f"note: {note}")
        result = run_training(config, action, study.log)
        if result.stop_signal:
            raise KeyboardInterrupt(f"{action} stopped by {result.stop_signal}")
        return {"run_dir": str(result.run_dir), "best_epoch": result.state.best_epoch,
                "precision": precision_of(config.precision, study),
                "steps": result.state.step, "stop_reason": result.stop_reason}

    where = (fraction, settings_key(sdm))
    trained = study.unit("sdm-train", key, f"training the SDM on {len(list((data_dir / 'train/images').iterdir()))} "
                                           f"images ({fraction_tag(fraction)})", lambda: train("train", train_values),
                         where)
    if trained is None:
        return None
    if sdm.get("finetune") is None:
        return Path(trained["run_dir"])
    finetune_values = {**common, **sdm["finetune"], "resume_checkpoint": trained["run_dir"]}
    key = fingerprint("sdm-finetune", with_best_epoch_rule(finetune_values), subset_key)
    tuned = study.unit("sdm-finetune", key, f"finetuning the SDM with null labels ({fraction_tag(fraction)})",
                       lambda: train("finetune", finetune_values), where)
    return None if tuned is None else Path(tuned["run_dir"])


def train_mask_generator(study: Study, fraction: float, name: str, data_dir: Path, subset_key: str) -> Path | None:
    """Train generator `name`'s mask generator (`main.py masks` keys) on the subset's masks; returns its run
    folder (None: not trained yet in a report-only run)."""
    from guided_diffusion.masks.train import mask_config, train_mask_generator as train_masks

    values = {**study.config.mask_generator_keys(str(data_dir), study.num_classes), "seed": study.config.seed,
              **(study.config.generators[name].mask_generator or {})}
    key = fingerprint("masks-train", values, subset_key)

    def work() -> dict[str, Any]:
        config = mask_config({**values, "root_log_dir": str(study.root / "masks" / fraction_tag(fraction) / key),
                              "auto_resume": True}, f"study generators.{name}.mask_generator")
        result = train_masks(config, study.log)
        if result.stop_signal:
            raise KeyboardInterrupt(f"masks stopped by {result.stop_signal}")
        return {"run_dir": str(result.run_dir), "steps": result.state.step, "stop_reason": result.stop_reason,
                "precision": precision_of(config.precision, study)}

    done = study.unit("masks-train", key, f"training the mask generator of {name} on the masks of "
                                          f"{fraction_tag(fraction)}", work, (fraction, name))
    return None if done is None else Path(done["run_dir"])


def filter_generated(study: Study, fraction: float, name: str, source: dict[str, Any], data_dir: Path
                     ) -> dict[str, Any] | None:
    """FreeMask-filter the images of a generator's source run: a scorer trained on the subset's real images
    (cached under scorers/) marks the synthetic pixels it finds implausible as ignored (labels_filtered/)."""
    from ..freemask import FILTER_REPORT, filter_folders

    config, protocol = study.config, study.config.segmenter
    generator = config.generators[name]
    settings = generator.filter
    scorer = ScorerSettings(protocol.architecture, protocol.encoder, config.image_size, config.resize_mode,
                            protocol.steps, protocol.batch_size, protocol.lr, protocol.weight_decay, True, config.seed)
    key = fingerprint("filter", source["fingerprint"], dataclasses.asdict(settings), dataclasses.asdict(scorer))
    # the filter writes labels_filtered/ into the folder it filters: it gets a folder of its own that links the
    # source's files, so the source stays as sampled and each filter setting keeps its own labels
    run_dir = study.root / "synthetic" / data_dir.name / f"{name}-{key}" / "sample_001"

    def work() -> dict[str, Any]:
        if not (run_dir / FILTER_REPORT).is_file():  # a kill after the filter wrote its files: reuse them
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a copy cut short by a kill (the study's own folder)
            run_dir.mkdir(parents=True)
            origin = Path(source["run_dir"])
            for entry in origin.iterdir():
                if entry.is_dir() and entry.name in ("samples", "labels", "images", "colored_labels"):
                    (run_dir / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
            shutil.copyfile(origin / "config.json", run_dir / "config.json")
            folder = index_sample_folder(run_dir, study.num_classes)
            filter_folders([folder], str(data_dir), config.dataset_mode, study.num_classes, scorer, settings,
                           str(study.root / "scorers"), True, study.device, study.log, study.progress)
        report = json.loads((run_dir / FILTER_REPORT).read_text(encoding="utf-8"))
        return {"run_dir": str(run_dir), "images": report["kept_images"], "dropped": report["dropped_images"],
                "ignored_pixel_share": report["ignored_pixel_share"], "labels": "filtered"}

    return study.unit("filter", key, f"filtering {generator.source}'s images into {name} ({fraction_tag(fraction)})",
                      work, (fraction, name))


def generate(study: Study, fraction: float, name: str, data_dir: Path, model_dir: Path | None,
             subset_key: str, done: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Sample one generator's pairs for a fraction (or filter its source's, already in `done`); returns its
    ledger entry (run_dir, images, seconds), or None in a report-only run when it (or what it needs) is not
    done yet."""
    from guided_diffusion.sampling.sample import run_sampling

    from ..freemask import measure_hardness  # the scorer of hardness_args, handed to the sample action

    generator = study.config.generators[name]
    if generator.labels == "filtered":
        source = done.get(generator.source)
        return None if source is None else filter_generated(study, fraction, name, source, data_dir)
    if generator.kind == "sdm" and model_dir is None:
        return None  # report-only, the SDM not trained yet
    model_keys = study.config.sdm_settings(name).get("model", {})
    values = {**study.config.generator_keys(str(data_dir), study.num_classes), **model_keys,
              "seed": study.config.seed, **generator.sample_keys}
    if generator.kind == "paste":
        values = {k: v for k, v in values.items() if k not in model_keys}
    if model_dir is not None:
        values["model_path"] = str(model_dir)
    if generator.mask_generator is not None:
        masks_run = train_mask_generator(study, fraction, name, data_dir, subset_key)
        if masks_run is None:
            return None  # report-only, the mask generator not trained yet
        values["mask_source"] = str(masks_run)
    key = fingerprint("sample", values, subset_key, generator.kind)
    root = study.root / "synthetic" / fraction_tag(fraction) / f"{name}-{key}"

    def work() -> dict[str, Any]:
        config, notes = config_from_dict("sample", {**values, "root_log_dir": str(root)}, f"study generators.{name}")
        for note in notes:
            study.log(f"note: {note}")
        summary = run_sampling(config, set(values), f"study generators.{name}", study.log, measure_hardness)
        return {"run_dir": summary["run_dir"], "images": summary["num_samples"],
                "seconds_per_image": summary.get("seconds_per_image"),
                "precision": precision_of(config.precision, study)}

    return study.unit("sample", key, f"generator {name} ({generator.kind}) at {fraction_tag(fraction)}", work,
                      (fraction, name))


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


def subset_key_of(pairs: list[Pair], data_dir: str) -> str:
    """What identifies a real subset in the keys of the units trained or sampled on it."""
    return fingerprint([p.stem for p in pairs], data_dir)


def print_flushed(line: str) -> None:
    """The study's log: stdout, each line flushed as it is written (a log file shows where the study is)."""
    print(line, flush=True)


def run_study(config: StudyConfig, values: dict[str, Any], command: str = "",
              log: Callable[[str], None] = print_flushed,
              progress: bool = True, report_only: bool = False) -> Path:
    """Run the study (or, with `report_only`, run nothing and report the units the ledger holds)."""
    from guided_diffusion.model_setup import bf16_autocast, processor_name, select_device

    from .report import write_report

    started = time.perf_counter()
    num_classes = resolve_num_classes(config)
    check_study(config, num_classes)
    names = class_names(config.data_dir, num_classes)
    device = select_device(config.device)
    wanted = config.segmenter.precision
    bf16 = bf16_autocast(wanted, device)  # the SDM's rule: "auto" = bf16 where it is native (measured faster)
    if wanted == "bf16" and not bf16:
        raise ConfigError(f"key 'segmenter.precision' is bf16 but this {device.type} has no native bf16; use auto")
    if not report_only:  # an encoder's weights that cannot be had (offline, a bad file) stop the study before any work
        segmenter = config.segmenter
        build_segmenter(SegmenterSpec(segmenter.architecture, num_classes, segmenter.encoder,
                                      segmenter.encoder_weights))
    split = make_split(config, num_classes)  # the dataset is checked whole here, before anything is written
    check_backgrounds_exist(config, split)
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    lines = UnitProgress(plan_units(config, num_classes, SplitSizes.of(split)), log, started)
    study = Study(config, root, num_classes, names, Ledger(root / "ledger.jsonl"), device, bf16, log, lines,
                  processor_name(device), progress, report_only)
    done = len(study.ledger.entries)
    log(f"study folder: {root} ({f'resuming: {done} units done' if done else 'new'})"
        + ("; report only: nothing is run" if report_only else ""))
    if not report_only:
        write_json(root / f"config{'_quick' if config.quick else ''}.json", {**values, "_command": command})
    write_json(root / "split.json", {"val": [p.stem for p in split.val],
                                     **{fraction_tag(f): [p.stem for p in s] for f, s in split.subsets.items()}})
    log(f"real data: {sum(len(s) for s in [split.val])} validation, "
        + ", ".join(f"{len(s)} at {fraction_tag(f)}" for f, s in split.subsets.items())
        + f", {len(split.test)} test images (test used for scoring only)")
    loaded_at = time.perf_counter()
    val = load_pairs(split.val, config.dataset_mode, config.image_size, config.resize_mode, "val")
    test = load_pairs(split.test, config.dataset_mode, config.image_size, config.resize_mode, "test")
    load_seconds = time.perf_counter() - loaded_at

    # the seed list is left out (each unit's key has its seed): adding a seed redoes nothing else
    protocol = config.segmenter.fingerprint_keys()
    protocol_key = fingerprint(protocol, config.image_size, config.resize_mode,
                               config.val_fraction, config.seed, config.background_class, config.ignore_index,
                               [p.stem for p in split.val], [p.stem for p in split.test])
    rows: list[dict[str, Any]] = []
    generator_runs: dict[str, dict[str, Any]] = {}
    sdm_runs: dict[tuple[float, str], Path | None] = {}
    looks: dict[float, dict[str, ImageSetLook]] = {}

    def sdm_of(fraction: float, name: str) -> Path | None:
        """The SDM a generator samples: of its settings (`sdm_settings`), trained on its `sdm_fraction`'s subset
        (default: this fraction's); each (subset, settings) trained once."""
        generator = config.generators[name]
        if generator.kind != "sdm" or generator.labels == "filtered":
            return None
        trained_at = generator.sdm_fraction if generator.sdm_fraction is not None else fraction
        settings = config.sdm_settings(name)
        key = (trained_at, fingerprint(settings))
        if key not in sdm_runs:
            pairs = split.subsets[trained_at]
            sdm_runs[key] = train_generator(study, trained_at, lay_out_subset(study, trained_at, pairs),
                                            subset_key_of(pairs, config.data_dir), settings)
        return sdm_runs[key]

    for fraction in config.real_fractions:
        tag = fraction_tag(fraction)
        pairs = split.subsets[fraction]
        subset_key = subset_key_of(pairs, config.data_dir)
        data_dir = lay_out_subset(study, fraction, pairs)
        runs: dict[str, dict[str, Any]] = {}
        for name in config.generators_at(fraction):  # sources of filtered generators come first
            runs[name] = generate(study, fraction, name, data_dir, sdm_of(fraction, name), subset_key, runs)
        runs = {name: run for name, run in runs.items() if run is not None}  # None: report-only, not done
        for name, run in runs.items():
            generator_runs[f"{tag}/{name}"] = run
        real = load_pairs(pairs, config.dataset_mode, config.image_size, config.resize_mode, tag)
        synthetic = {name: load_generated(study, name, run["run_dir"]) for name, run in runs.items()}
        if synthetic:  # how each set draws each class (the report's "Defect contrast" and "Defect roughness")
            looks[fraction] = {name: image_set_look(images.images, images.masks, list(range(study.num_classes)),
                                                    config.background_class, ignored_label(study))
                               for name, images in {"real": real, **synthetic}.items()}
        variants = sorted(config.variants_at(fraction), key=lambda v: not v.is_baseline)  # baseline first
        for variant in variants:
            if any(name not in runs for name in variant.synthetic):
                continue  # report-only: its data is not generated yet
            sources = {name: runs[name]["fingerprint"] for name in variant.synthetic}
            recipe = variant.recipe()
            for seed in config.segmenter.seeds:
                key = fingerprint("segmenter", protocol_key, subset_key, recipe, sources, seed)
                needs = {n: synthetic[n] for n in variant.synthetic}
                row = study.unit("segmenter", key, f"segmenter {tag} {variant.name} seed {seed}",
                                 lambda: train_and_score(study, fraction, variant, seed, real, needs, val, test, key),
                                 (fraction, variant.name, seed))
                if row is None:
                    continue
                if variant.is_baseline:  # label alignment, a unit per generator: adding one redoes nothing else
                    aligned = {}
                    for name, run in runs.items():
                        done = study.unit("alignment", fingerprint("alignment", key, run["fingerprint"]),
                                          f"label alignment of {name} ({tag}, seed {seed})",
                                          lambda: align(study, fraction, variant, seed, real, val, key,
                                                        synthetic[name]), (fraction, name, seed))
                        if done is not None:
                            aligned[name] = {k: v for k, v in done.items() if k not in ("kind", "fingerprint",
                                                                                          "seconds")}
                    row = {**row, "alignment": aligned}
                rows.append(row)
        del real, synthetic
    if not report_only:
        lines.close()
    seconds = time.perf_counter() - started
    write_report(study, rows, generator_runs, split, command, seconds, load_seconds, looks)
    log(f"report: {root / 'report.md'}")
    return root


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
                             "study's estimated wall time by stage and exit (writes nothing; about a minute)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write report.md and summary.json from the units finished so far")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (for log files); the one-line progress of each unit, with the time "
                             "elapsed and left, stays")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    if args.no_progress:  # for processes started from here; this one's tqdm read it at import (experiment.sh
        os.environ["TQDM_DISABLE"] = "1"  # sets it before Python starts)

    def action() -> None:
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
            print(estimate_study(config, num_classes, make_split(config, num_classes), print))
            return
        run_study(config, values, shlex.join([PROG, *argv]), progress=not args.no_progress,
                  report_only=args.report_only)

    return exit_status(action)


if __name__ == "__main__":
    sys.exit(main())

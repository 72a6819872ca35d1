"""The evaluation run: real + synthetic folders -> a segmenter per mix x model x seed -> metrics, tables, plots.

Everything the user gave is checked before the run folder is made and before any training: the dataset, the
sample folders, the mixes against the images available, the segmenters and weights files. A mistake stops the
run with one line and nothing written.

Run folder (`<root_log_dir>/evaluate_NNN/`):
    config.json        resolved settings, class names, image counts, sample folders used
    metrics.csv        one row per mix x model x seed (written as each run ends)
    summary.csv/.md    mean ± std over seeds; summary.md also holds per-class IoU, label alignment and FID/KID
    alignment.csv      label-alignment score per sample folder x model x seed (when there are sample folders)
    fid.csv            FID/KID per sample folder (only with `inception_weights`)
    miou_vs_synthetic.png, per_class_iou.png
    summary.json       timings and the notes printed during the run
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guided_diffusion.data import canonical_dataset_mode, index_dataset
from guided_diffusion.errors import ConfigError
from guided_diffusion.run_folder import CsvLog, new_run_dir, write_csv, write_json
from guided_diffusion.model_setup import select_device

from ..fid import SKIPPED_NO_WEIGHTS, image_distance, inception_features, load_inception
from ..image_sets import (
    IGNORE_INDEX,
    check_label_keys,
    ImageSet,
    SampleFolder,
    class_names,
    concatenate,
    index_sample_folder,
    load_pairs,
    resolve_num_classes,
    training_set,
    load_sample_folder,
)
from ..segmenter.metrics import SUMMARY_METRICS, metric_columns
from ..segmenter.model import SegmenterSpec, TrainSettings, build_segmenter
from ..segmenter.run import Scoring, train_and_test
from ..segmenter.settings import canonical_architecture
from . import report
from .config import EvaluateConfig, config_to_dict
from .mixes import Mix, chosen_indices, parse_mixes

RUN_COLUMNS = ["mix", "real_images", "synthetic_images", "model", "encoder", "seed"]


@dataclass(frozen=True)
class Inputs:
    """Everything a run trains and tests on, checked and loaded."""

    num_classes: int
    class_names: list[str]
    train: ImageSet
    test: ImageSet
    synthetic: list[ImageSet]  # one per sample folder
    pool: ImageSet | None  # all synthetic pairs, the source of the mixes' synthetic images
    mixes: list[Mix]
    counts: dict[Mix, tuple[int, int]]
    notes: list[str]


def _unique_names(folders: list[SampleFolder]) -> list[str]:
    """Sample folder names for tables: the folder name, with its parent's when two folders share a name."""
    names = [f.name for f in folders]
    return [f"{f.path.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]


def prepare(config: EvaluateConfig, log: Callable[[str], None] = print) -> Inputs:
    """Check every input (cheap checks first) and load the images; raises a UserError on the first problem."""
    mode = canonical_dataset_mode(config.dataset_mode)
    mixes = parse_mixes(config.mixes)
    notes: list[str] = []
    num_classes = resolve_num_classes(config, config.sample_dirs)
    folders = [index_sample_folder(path, num_classes, config.synthetic_labels) for path in config.sample_dirs]
    names = class_names(config.data_dir, num_classes)

    needs_synthetic = [mix.name for mix in mixes if mix.uses_synthetic]
    if needs_synthetic and not folders:
        raise ConfigError(f"key 'mixes': {', '.join(needs_synthetic)} use synthetic images but no sample folder "
                          "was given (key 'sample_dirs', option --samples)")
    check_label_keys(config.background_class, config.ignore_index, num_classes)
    index = index_dataset(config.data_dir, mode, num_classes, require_test=True, ignore_value=config.ignore_index)
    num_synthetic = sum(len(folder.pairs) for folder in folders)
    if config.label_alignment and folders and not any(mix.is_all_real_only for mix in mixes):
        mixes = [Mix(None, 0)] + mixes
        notes.append("mix RALLF000 added: the label-alignment score uses segmenters trained on all real images")
    counts = {mix: mix.counts(len(index.train), num_synthetic) for mix in mixes}
    for folder in folders:
        if config.synthetic_labels == "filtered":
            notes.append(f"sample folder {folder.path}: filtered labels ({folder.dropped} images dropped, "
                         f"{folder.ignore_index} = ignored pixels)")
        elif folder.ignore_index is not None and folder.ignore_index != _ignore_index(config):
            raise ConfigError(f"sample folder {folder.path}: its labels keep void pixels of value "
                              f"{folder.ignore_index} (sampled with ignore_index {folder.ignore_index}); set key "
                              f"'ignore_index' to {folder.ignore_index} so that evaluation skips them")
    for folder in folders:
        if folder.data_dir and Path(folder.data_dir).name != Path(config.data_dir).name:
            notes.append(f"sample folder {folder.path} was sampled from data_dir {folder.data_dir}, evaluated on "
                         f"{config.data_dir}")

    for name in config.models:  # unknown encoders and unfitting weight files fail here, before any loading
        build_segmenter(SegmenterSpec(canonical_architecture(name), num_classes, config.encoder,
                                      config.encoder_weights))

    log(f"loading {num_synthetic} synthetic pairs and {len(index.train)} train + {len(index.test)} test real pairs "
        f"at {config.image_size} px")
    synthetic = [dataclasses.replace(load_sample_folder(folder, num_classes, config.image_size, config.resize_mode),
                                     name=unique)
                 for folder, unique in zip(folders, _unique_names(folders))]
    train = load_pairs(index.train, mode, config.image_size, config.resize_mode, "train")
    test = load_pairs(index.test, mode, config.image_size, config.resize_mode, "test")
    pool = concatenate(synthetic, "synthetic") if synthetic else None
    return Inputs(num_classes, names, train, test, synthetic, pool, mixes, counts, notes)


def mix_training_set(inputs: Inputs, mix: Mix, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and masks of a mix for a seed (nested subsets; see mixes.py)."""
    num_real, num_synthetic = inputs.counts[mix]
    parts = [(inputs.train, chosen_indices(num_real, len(inputs.train), seed, "real"))]
    if num_synthetic:
        assert inputs.pool is not None
        parts.append((inputs.pool, chosen_indices(num_synthetic, len(inputs.pool), seed, "synthetic")))
    return training_set(parts)


def _ignore_index(config: EvaluateConfig) -> int | None:
    """The label value the losses and metrics skip: key ignore_index, else 255 with filtered synthetic labels."""
    if config.ignore_index is not None:
        return config.ignore_index
    return IGNORE_INDEX if config.synthetic_labels == "filtered" else None


def run_evaluation(config: EvaluateConfig, command: str = "", log: Callable[[str], None] = print,
                   progress: bool = True) -> Path:
    """Run the whole evaluation into a fresh run folder and return it."""
    started = time.perf_counter()
    device = select_device(config.device)
    extractor = load_inception(config.inception_weights) if config.inception_weights else None
    inputs = prepare(config, log)
    for note in inputs.notes:
        log(f"note: {note}")

    run_dir = new_run_dir(config.root_log_dir, "evaluate")
    log(f"run folder: {run_dir}")
    architectures = [canonical_architecture(name) for name in config.models]
    write_json(run_dir / "config.json", {
        **config_to_dict(config),
        "num_classes": inputs.num_classes,
        "class_names": inputs.class_names,
        "mixes_resolved": {mix.name: {"real": r, "synthetic": s} for mix, (r, s) in inputs.counts.items()},
        "real_train_images": len(inputs.train),
        "real_test_images": len(inputs.test),
        "sample_folders": {s.name: len(s) for s in inputs.synthetic},
        "device_used": str(device),
        "command": command,
    })

    total = len(inputs.mixes) * len(architectures) * len(config.seeds)
    log(f"{total} training runs ({len(inputs.mixes)} mixes x {len(architectures)} models x {len(config.seeds)} "
        f"seeds) of {config.steps} steps, batch {config.batch_size}, on {device}; testing on {len(inputs.test)} "
        "real test images")
    metric_names = metric_columns(inputs.class_names)
    scoring = Scoring(inputs.num_classes, _ignore_index(config), config.background_class)
    rows: list[dict[str, Any]] = []
    alignment_rows: list[dict[str, Any]] = []
    alignment_log = None
    number = 0
    with CsvLog(run_dir / "metrics.csv", RUN_COLUMNS + metric_names + ["final_loss", "train_seconds"]) as metrics_log:
        for mix in inputs.mixes:
            num_real, num_synthetic = inputs.counts[mix]
            for architecture in architectures:
                spec = SegmenterSpec(architecture, inputs.num_classes, config.encoder, config.encoder_weights)
                for seed in config.seeds:
                    number += 1
                    images, masks = mix_training_set(inputs, mix, seed)
                    # no validation set: the last weights; the label alignment of each sample folder by the
                    # segmenters trained on all real images
                    settings = TrainSettings(config.steps, config.batch_size, config.lr, config.weight_decay,
                                             config.augment, seed, _ignore_index(config))
                    aligning = config.label_alignment and mix.is_all_real_only
                    run = train_and_test(images, masks, spec, settings, scoring, device, test=inputs.test,
                                         generated=inputs.synthetic if aligning else (),
                                         desc=f"[{number}/{total}] {architecture} {mix.name} seed {seed}",
                                         progress=progress)
                    metrics, seconds = run.test, run.train_seconds
                    row = {"mix": mix.name, "real_images": num_real, "synthetic_images": num_synthetic,
                           "model": architecture, "encoder": config.encoder, "seed": seed,
                           **metrics.row(inputs.class_names), "final_loss": run.final_loss,
                           "train_seconds": round(seconds, 2)}
                    metrics_log.write(row)
                    rows.append(row)
                    log(f"  {architecture} {mix.name} seed {seed}: mIoU {metrics.miou:.4f}, without background "
                        f"{metrics.miou_no_bg:.4f} ({seconds:.0f} s)")
                    for synthetic in inputs.synthetic if aligning else ():
                        aligned = {"sample_folder": synthetic.name, "model": architecture,
                                   "encoder": config.encoder, "seed": seed, "images": len(synthetic),
                                   "real_test_miou": metrics.miou, "real_test_miou_no_bg": metrics.miou_no_bg,
                                   **run.alignment[synthetic.name].row(inputs.class_names)}
                        if alignment_log is None:
                            alignment_log = CsvLog(run_dir / "alignment.csv", list(aligned))
                        alignment_log.write(aligned)
                        alignment_rows.append(aligned)
                    del run
    if alignment_log is not None:
        alignment_log.close()

    distances, fid_note = _image_distances(extractor, inputs, device, run_dir)
    seconds = time.perf_counter() - started
    text = _write_summaries(run_dir, config, inputs, rows, alignment_rows, distances, fid_note, command, seconds,
                            str(device))
    log("")
    log(text)
    log(f"\ndone in {_duration(seconds)}: {run_dir}")
    return run_dir


def _image_distances(extractor, inputs: Inputs, device, run_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """FID/KID rows per sample folder (real = the real train split), or a note saying why there are none."""
    if not inputs.synthetic:
        return [], "FID skipped (no sample folders)"
    if extractor is None:
        return [], SKIPPED_NO_WEIGHTS
    real_features = inception_features(extractor, inputs.train.images, device)
    rows = []
    for synthetic in inputs.synthetic:
        if len(synthetic) < 2:
            rows.append({"sample_folder": synthetic.name, "real_images": len(inputs.train),
                         "synthetic_images": len(synthetic), "fid": math.nan, "kid_mean": math.nan,
                         "kid_std": math.nan})
            continue
        distance = image_distance(real_features, inception_features(extractor, synthetic.images, device))
        rows.append({"sample_folder": synthetic.name, "real_images": distance.num_real,
                     "synthetic_images": distance.num_synthetic, "fid": distance.fid, "kid_mean": distance.kid_mean,
                     "kid_std": distance.kid_std})
    write_csv(run_dir / "fid.csv", rows)
    return rows, ("FID/KID with the given Inception weights (torchvision network; compare within this project "
                  "only; FID needs two or more images per set)")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def _write_summaries(run_dir: Path, config: EvaluateConfig, inputs: Inputs, rows: list[dict[str, Any]],
                     alignment_rows: list[dict[str, Any]], distances: list[dict[str, Any]], fid_note: str,
                     command: str, seconds: float, device: str) -> str:
    """summary.csv, summary.md, summary.json and the plots; returns the text printed at the end."""
    per_class = [f"iou_{name}" for name in inputs.class_names]
    metrics = list(SUMMARY_METRICS) + per_class + [f"image_iou_{name}" for name in inputs.class_names] \
        + [f"f1_{name}" for name in inputs.class_names]
    summary = report.summarize(rows, ["model", "mix"], metrics, keep=["real_images", "synthetic_images", "encoder"])
    write_csv(run_dir / "summary.csv", summary)
    report.plot_miou_vs_synthetic(run_dir / "miou_vs_synthetic.png", summary)
    report.plot_per_class_iou(run_dir / "per_class_iou.png", summary, inputs.class_names)

    table = report.results_table(summary)
    seeds = ", ".join(str(s) for s in config.seeds)
    lines = [
        f"# Evaluation {run_dir.name}",
        "",
        f"Does synthetic data raise mIoU? Segmenters trained on each mix, tested on the real test split "
        f"({len(inputs.test)} images of {config.data_dir}) at {config.image_size} px; mean ± std over seeds {seeds}.",
        "",
        f"- command: `{command}`" if command else "- command: (called from Python)",
        f"- real train images: {len(inputs.train)}; synthetic labels: {config.synthetic_labels}; sample folders: "
        + (", ".join(f"{s.name} ({len(s)} images)" for s in inputs.synthetic) or "none"),
        f"- segmenters: {', '.join(dict.fromkeys(r['model'] for r in rows))} with encoder {config.encoder} "
        f"({'weights ' + config.encoder_weights if config.encoder_weights else 'random init'}), {config.steps} steps "
        f"of batch {config.batch_size}, AdamW lr {config.lr:g}, Dice + cross-entropy",
        f"- time: {_duration(seconds)} on {device}",
        "",
        "## Test on real images",
        "",
        table,
        "",
        "## Per-class IoU (dataset level)",
        "",
        report.per_class_table(summary, inputs.class_names),
        "",
    ]
    printed = [table]
    alignment_summary: list[dict[str, Any]] = []
    if alignment_rows:
        scalars = ["miou", "miou_no_bg", "real_test_miou", "real_test_miou_no_bg"]
        alignment_summary = report.summarize(alignment_rows, ["sample_folder", "model"], scalars, keep=["images"])
        header = ["sample folder", "segmenter (RALLF000)", "images", "seeds", "alignment mIoU",
                  "alignment mIoU w/o bg", "real test mIoU", "real test mIoU w/o bg"]
        body = [[r["sample_folder"], r["model"], r["images"], r["seeds"]]
                + [report.format_mean_std(r[f"{m}_mean"], r[f"{m}_std"]) for m in scalars] for r in alignment_summary]
        alignment_table = report.markdown_table(header, body)
        lines += ["## Label alignment", "",
                  "Segmenters trained on all real images segment the synthetic images; mIoU against the masks that "
                  "conditioned them (near chance: samples ignore their masks; near the real test mIoU: they follow "
                  "them).", "", alignment_table, ""]
        printed += ["", "Label alignment:", alignment_table]
    elif config.label_alignment:
        lines += ["## Label alignment", "", "skipped (no sample folders)", ""]
    lines += ["## FID / KID", ""]
    if distances:
        fid_table = report.markdown_table(
            ["sample folder", "real images", "synthetic images", "FID", "KID"],
            [[d["sample_folder"], d["real_images"], d["synthetic_images"], f"{d['fid']:.2f}",
              report.format_mean_std(d["kid_mean"], d["kid_std"], 4)] for d in distances])
        lines += [fid_note, "", fid_table, ""]
        printed += ["", fid_table]
    else:
        lines += [fid_note, ""]
        printed += ["", fid_note]
    lines += ["![mIoU vs synthetic images](miou_vs_synthetic.png)", "", "![per-class IoU](per_class_iou.png)", ""]
    (run_dir / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    write_json(run_dir / "summary.json", {
        "seconds": round(seconds, 1),
        "device": device,
        "runs": len(rows),
        "notes": inputs.notes,
        "fid": fid_note if not distances else distances,
        "summary": summary,
        "label_alignment": alignment_summary,
    })
    return "\n".join(printed)

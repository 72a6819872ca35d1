"""The low-data study's report: report.md, summary.json, results.csv and plots, from the ledger's rows.

The paired difference of a variant is taken seed by seed against the real-only baseline of the same fraction
(same seed = same initial weights and batch order), and its 95 % interval is the Student-t interval of the
mean of those differences over seeds: mean +- t(0.975, n - 1) * sd / sqrt(n).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from guided_diffusion.run_folder import markdown_table, write_csv, write_json

from ..contrast import INNER, OUTER, ROUGHER, ImageSetLook
from .config import SegmenterProtocol, StudyConfig, Variant
from .context import Split, Study
from .generators import report_group, report_note
from .units import fraction_tag


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def t_quantile(dof: int) -> float:
    """Student's t 0.975 quantile for `dof` degrees of freedom (table; 1.96 beyond 29)."""
    if dof in _T975:
        return _T975[dof]
    smaller = [d for d in _T975 if d < dof]
    return _T975[max(smaller)] if dof < 30 else 1.96


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95 % Student-t interval (NaN bounds with fewer than two pairs)."""
    values = np.asarray([d for d in differences if not math.isnan(d)], dtype=float)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_differences(cell: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]]) -> list[float]:
    """mIoU w/o bg of `cell` minus `other`'s, seed by seed, over the seeds both have (rows keyed by seed)."""
    return [cell[s]["miou_no_bg"] - other[s]["miou_no_bg"] for s in sorted(cell) if s in other]


def generator_kind(study: Study, variant_name: str) -> str:
    """Which generator made a variant's extra data: sdm, paste, augment (classic augmentation only) or none."""
    variant = next(v for v in study.config.variants if v.name == variant_name)
    groups = {report_group(study.config.generators[name]) for name in variant.synthetic}
    if "sdm" in groups:
        return "sdm"
    if groups:
        return sorted(groups)[0]
    return "augment" if variant.augment == "strong" else "none"


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _start(encoder_weights: str | None) -> str:
    """Where the segmenters' encoder starts, in words."""
    if encoder_weights is None:
        return "random init"
    return "ImageNet weights" if encoder_weights == "imagenet" else f"weights {encoder_weights}"


def _points(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:+.1f}"


def summarize(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (fraction, variant): means over seeds, the paired difference to the baseline and its CI."""
    by_cell: dict[tuple[float, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        by_cell[(row["fraction"], row["variant"])][row["seed"]] = row
    records = []
    for fraction in study.config.real_fractions:
        baseline = next(v.name for v in study.config.variants_at(fraction) if v.is_baseline)
        base = by_cell.get((fraction, baseline), {})
        for variant in study.config.variants_at(fraction):
            cell = by_cell.get((fraction, variant.name), {})
            if not cell:
                continue
            seeds = sorted(cell)
            record: dict[str, Any] = {"real_fraction": fraction, "variant": variant.name,
                                      "generator": generator_kind(study, variant.name), "seeds": len(seeds),
                                      "real_images": cell[seeds[0]]["real_images"],
                                      "synthetic_images": cell[seeds[0]]["synthetic_images"],
                                      "is_baseline": variant.is_baseline}
            for metric in ("miou_no_bg", "miou"):
                values = [cell[s][metric] for s in seeds]
                record[metric] = float(np.nanmean(values))
                record[f"{metric}_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan
            paired = paired_differences(cell, base)
            record["diff"], record["ci_low"], record["ci_high"] = paired_interval(paired)
            record["paired_seeds"] = len(paired)
            for name in study.class_names:
                record[f"iou_{name}"] = float(np.nanmean([cell[s][f"iou_{name}"] for s in seeds]))
            record["selected_steps"] = [cell[s].get("selected_step") for s in seeds]
            without = without_sdm(study, variant, fraction)
            if without is not None and by_cell.get((fraction, without)):
                other = by_cell[(fraction, without)]
                record["without_sdm"] = without
                paired_sdm = paired_differences(cell, other)
                record["sdm_diff"], record["sdm_ci_low"], record["sdm_ci_high"] = paired_interval(paired_sdm)
                record["sdm_seeds"] = len(paired_sdm)
            record["versus"] = []
            for other_name in variant.versus:
                paired = paired_differences(cell, by_cell.get((fraction, other_name), {}))
                if paired:
                    diff, low, high = paired_interval(paired)
                    record["versus"].append({"variant": other_name, "diff": diff, "ci_low": low, "ci_high": high,
                                             "seeds": len(paired), "verdict": interval_verdict(low, high, len(paired))})
            records.append(record)
    return records


def machine(row: dict[str, Any]) -> str:
    """Where a ledger row's unit ran: its processor model and its precision ("AMD EPYC (family 25, model 1),
    fp32"); "" for a row from a ledger older than the record."""
    processor = row.get("processor") or ""
    return f"{processor}, {row['precision']}" if processor and row.get("precision") else processor


def _threads_note(rows: list[dict[str, Any]]) -> str:
    """The CPU threads the segmenters ran with, where recorded: '; 2 CPU threads' or '; 1 or 2 CPU threads (...)'.
    Units run side by side (several processes on one CPU) use fewer threads each; the count changes float rounding
    only."""
    threads = sorted({row["threads"] for row in rows if row.get("threads")})
    if not threads:
        return ""
    unrecorded = sum(not row.get("threads") for row in rows)
    where = (f" where recorded ({unrecorded} segmenter{'s' if unrecorded > 1 else ''} ran before the record)"
             if unrecorded else "")
    if len(threads) == 1:
        return f"; {threads[0]} CPU thread{'s' if threads[0] > 1 else ''} per segmenter{where}"
    return (f"; {' or '.join(map(str, threads))} CPU threads per segmenter{where} (the count changes the rounding "
            "of sums, not a seed's initial weights or batch order)")


def mixed_processors(rows: list[dict[str, Any]]) -> list[str]:
    """The paired cells whose segmenters ran on different processor models or in different precisions, as
    "25 % seed 3: A, bf16 (real); B, fp32 (paste)" lines; bf16 scores differ between CPU models, and bf16 from
    fp32, so such a pair's difference mixes in the machines'. Rows from a ledger older than the record (no
    "processor") are left out."""
    groups: dict[tuple[float, int], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if name := machine(row):
            groups[(row["fraction"], row["seed"])][name].append(row["variant"])
    return [f"{100 * fraction:g} % seed {seed}: "
            + "; ".join(f"{name} ({', '.join(variants)})" for name, variants in sorted(by.items()))
            for (fraction, seed), by in sorted(groups.items()) if len(by) > 1]


def _sdm_share(records: list[dict[str, Any]]) -> list[str]:
    """The report's table of what the SDM adds: each SDM variant paired against itself without the SDM."""
    rows = [r for r in records if "without_sdm" in r]
    if not rows:
        return []
    body = [[f"{100 * r['real_fraction']:.0f} %", r["variant"], r["without_sdm"], _points(r["sdm_diff"]),
             "–" if math.isnan(r["sdm_ci_low"]) else f"[{_points(r['sdm_ci_low'])}, {_points(r['sdm_ci_high'])}]",
             interval_verdict(r["sdm_ci_low"], r["sdm_ci_high"], r["sdm_seeds"])]
            for r in rows]
    return ["### What the SDM adds", "",
            "Each variant with SDM data against the same variant without it (same real images, augmentation and "
            "other generators), paired by seed: the SDM's own share of the difference.", "",
            markdown_table(["real", "variant", "without the SDM", "diff (points)", "95 % interval", "verdict"], body),
            ""]


def _versus(records: list[dict[str, Any]]) -> list[str]:
    """The report's table of the pairings that variants ask for (`versus`), e.g. a lever against the default."""
    body = [[f"{100 * r['real_fraction']:.0f} %", r["variant"], v["variant"], _points(v["diff"]),
             "–" if math.isnan(v["ci_low"]) else f"[{_points(v['ci_low'])}, {_points(v['ci_high'])}]", v["verdict"]]
            for r in records for v in r["versus"]]
    if not body:
        return []
    return ["### Against other variants", "",
            "Variants paired by seed with the variants they name in `versus` (e.g. a generator lever against the "
            "default generator): mIoU without background, in points.", "",
            markdown_table(["real", "variant", "against", "diff (points)", "95 % interval", "verdict"], body), ""]


def without_sdm(study: Study, variant: Variant, fraction: float) -> str | None:
    """The variant of the same fraction that is `variant` without its SDM generators (same real images, same
    augmentation, the other generators), so the SDM's own share of a gain can be paired out; None when `variant`
    uses no SDM or no such variant is studied."""
    generators = study.config.generators
    if variant.real is False or not any(report_group(generators[n]) == "sdm" for n in variant.synthetic):
        return None
    rest = sorted(n for n in variant.synthetic if report_group(generators[n]) != "sdm")
    for other in study.config.variants_at(fraction):
        if other.real == variant.real and other.augment == variant.augment and sorted(other.synthetic) == rest \
                and other.max_synthetic == variant.max_synthetic:
            return other.name
    return None


# A claim that synthetic data helps or hurts rests on at least this many paired seeds: with fewer, the interval's
# own width is estimated from so few differences that it clears 0 by chance too often to be called a result.
MIN_CLAIM_SEEDS = 5


def verdict(record: dict[str, Any]) -> str:
    """A variant's verdict on its paired difference to the baseline (interval_verdict)."""
    if record["is_baseline"]:
        return "baseline"
    return interval_verdict(record["ci_low"], record["ci_high"], record["paired_seeds"])


def interval_verdict(low: float, high: float, seeds: int) -> str:
    """'helps' when a paired 95 % interval over at least MIN_CLAIM_SEEDS seeds lies above 0, 'hurts' when below,
    else 'no clear effect'. With fewer seeds an interval that clears 0 only 'leans' that way: no claim."""
    if math.isnan(low):
        return "too few seeds"
    if low <= 0 <= high:
        return "no clear effect"
    word = "helps" if low > 0 else "hurts"
    if seeds < MIN_CLAIM_SEEDS:
        return f"leans {'up' if word == 'helps' else 'down'} ({seeds} seeds; {MIN_CLAIM_SEEDS} for a claim)"
    return word


def verdict_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per fraction: which variants measurably help or hurt, and the best SDM variant."""
    lines = []
    for fraction in dict.fromkeys(r["real_fraction"] for r in records):
        here = [r for r in records if r["real_fraction"] == fraction and not r["is_baseline"]]
        if not here:
            continue
        helps = [r for r in here if verdict(r) == "helps"]
        hurts = [r for r in here if verdict(r) == "hurts"]
        text = f"- **{100 * fraction:.0f} % real:** "
        text += ("helps: " + ", ".join(f"{r['variant']} ({_points(r['diff'])})" for r in helps)) if helps \
            else "no variant is measurably better than real-only"
        if hurts:
            text += "; hurts: " + ", ".join(f"{r['variant']} ({_points(r['diff'])})" for r in hurts)
        leaning = [r for r in here if verdict(r).startswith("leans")]
        if leaning:
            text += (f"; too few seeds for a claim (fewer than {MIN_CLAIM_SEEDS}), though the interval clears 0: "
                     + ", ".join(f"{r['variant']} ({_points(r['diff'])}, {r['paired_seeds']} seeds)"
                                 for r in leaning))
        sdm = [r for r in here if r["generator"] == "sdm"]
        if sdm:
            best = max(sdm, key=lambda r: r["diff"])
            text += (f"; best SDM variant: {best['variant']} {_points(best['diff'])} points "
                     f"[{_points(best['ci_low'])}, {_points(best['ci_high'])}] ({verdict(best)})")
        lines.append(text + ".")
    return lines


def _alignment(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fraction and generator: the real-only segmenters' mIoU on the generator's images against their masks,
    beside the same segmenters' mIoU on the real test split."""
    out = []
    for fraction in study.config.real_fractions:
        base_rows = [r for r in rows if r["fraction"] == fraction and "alignment" in r]
        names = sorted({name for r in base_rows for name in r["alignment"]})
        for name in names:
            seeds = [r for r in base_rows if name in r["alignment"]]  # the real test score of the same seeds
            scores = [r["alignment"][name]["miou_no_bg"] for r in seeds]
            out.append({"real_fraction": fraction, "generator": name,
                        "kind": study.config.generators[name].kind,
                        "alignment_miou_no_bg": _finite_mean(scores),
                        "real_test_miou_no_bg": _finite_mean([r["miou_no_bg"] for r in seeds]),
                        "seeds": len(scores)})
    return out


def _rougher(study: Study, looks: dict[float, dict[str, ImageSetLook]], fraction: float, name: str) -> list[str] | None:
    """The names of the classes generator `name` draws more than ROUGHER times as rough as the real subset of
    `fraction`; None when either set's look was not measured."""
    pair = _beside_real(looks, fraction, name)
    return None if pair is None else [study.class_names[c] for c in pair[0].rougher_than(pair[1])]


def _beside_real(looks: dict[float, dict[str, ImageSetLook]], fraction: float, name: str
                 ) -> tuple[ImageSetLook, ImageSetLook] | None:
    """The look of set `name` at `fraction` and the real subset's, or None when either was not measured."""
    sets = looks.get(fraction, {})
    return (sets[name], sets["real"]) if name in sets and "real" in sets else None


def _contrast_off(study: Study, looks: dict[float, dict[str, ImageSetLook]], fraction: float, name: str
                  ) -> list[str] | None:
    """The names of the classes generator `name` draws further from the real subset's mean contrast than the real
    images' spread (ImageSetLook.contrast_off); None when either set's look was not measured."""
    pair = None if name == "real" else _beside_real(looks, fraction, name)
    return None if pair is None else [study.class_names[c] for c in pair[0].contrast_off(pair[1])]


def _contrast_off_lines(study: Study, looks: dict[float, dict[str, ImageSetLook]]) -> list[str]:
    """One line per generator with a class off the real contrast: the class, its mean and the real one."""
    lines = []
    for fraction, sets in looks.items():
        for name in sets:
            pair = None if name == "real" else _beside_real(looks, fraction, name)
            off = [] if pair is None else pair[0].contrast_off(pair[1])
            if off:
                mine, real = pair[0].contrast, pair[1].contrast
                lines.append(f"- {100 * fraction:.0f} % {name}: " + ", ".join(
                    f"{study.class_names[c]} ({mine[c].mean:+.1f} against {real[c].mean:+.1f} ± "
                    f"{real[c].std:.1f})" for c in off))
    head = ("Drawn off the real contrast (a class's mean further from the real subset's mean than the real images' "
            "own spread, ± std; a place to look, no verdict):")
    return [head, "", *lines, ""] if lines else ["No generator draws a class further from the real subset's mean "
                                                 "contrast than the real images' own spread.", ""]


def _look_sections(study: Study, looks: dict[float, dict[str, ImageSetLook]]) -> list[str]:
    """The defect-contrast and defect-roughness tables: per fraction, the real subset's images and each
    generator's."""
    if not looks:
        return []
    first = next(iter(next(iter(looks.values())).values()))

    def table(field: str, signed: bool) -> str:
        classes = getattr(first, field).keys()
        return markdown_table(["real", "images"] + [study.class_names[c] for c in classes],
                              [[f"{100 * fraction:.0f} %", "real subset" if name == "real" else name]
                               + [getattr(look, field)[c].text(signed) for c in classes]
                               for fraction, sets in looks.items() for name, look in sets.items()])

    return ["## Defect contrast", "",
            f"How dark (-) or bright (+) each class is drawn: the mean grey level (0..255) of its pixels minus that "
            f"of a ring {INNER}-{OUTER} px around them, mean ± std over the images that hold the class (their "
            "count). A generator should draw each class about as the real subset's images show it; near 0 where "
            "the real contrast is not, the class is painted invisibly.", "",
            table("contrast", True), "", *_contrast_off_lines(study, looks),
            "## Defect roughness", "",
            "How noisy each class's pixels are: the mean |pixel - median of its 3x3 neighbourhood| in grey levels "
            "over the class's pixels, mean ± std over the images that hold the class (their count). A generator "
            "should be about as rough as the real subset; far rougher (the label-alignment table flags more than "
            f"{ROUGHER:g}x) means it paints the class as pixel noise.", "",
            table("roughness", False), ""]


def _finite_mean(values: list[float]) -> float:
    """The mean of the values that are not NaN (a class-less toy mask scores NaN); NaN when none is."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _plot_differences(path: Path, records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in records if not r["is_baseline"]]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.4))
    labels = [f"{r['variant']} ({100 * r['real_fraction']:.0f} %)" for r in shown]
    y = np.arange(len(shown))
    means = [100 * r["diff"] for r in shown]
    low = [100 * (r["diff"] - r["ci_low"]) if not math.isnan(r["ci_low"]) else 0 for r in shown]
    high = [100 * (r["ci_high"] - r["diff"]) if not math.isnan(r["ci_high"]) else 0 for r in shown]
    colours = {"sdm": "tab:blue", "paste": "tab:orange", "augment": "tab:green", "none": "tab:gray"}
    ax.errorbar(means, y, xerr=[low, high], fmt="none", ecolor="black", capsize=3)
    ax.scatter(means, y, c=[colours[r["generator"]] for r in shown], zorder=3)
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference to real-only, mIoU points without background (95 % interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    path = run_dir / "log.csv"
    if not path.is_file():
        return [], []
    steps, losses = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
            except (KeyError, ValueError):
                continue
    return steps, losses


def _plot_generator_curves(path: Path, study: Study) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(e["kind"], Path(e["run_dir"])) for (kind, _), e in study.ledger.entries.items()
            if kind in ("sdm-train", "sdm-finetune") and Path(e["run_dir"]).is_dir()]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset, plotted = 0, 0
    for kind, run_dir in sorted(runs, key=lambda r: (r[1].parent, r[0] != "sdm-train")):
        steps, losses = _read_curve(run_dir)
        if not steps:
            continue
        plotted += 1
        start = offset if kind == "sdm-finetune" else 0
        ax.plot([start + s for s in steps], losses, lw=0.8, label=f"{run_dir.parent.parent.name} {kind[4:]}")
        offset = max(steps) if kind == "sdm-train" else offset
    if not plotted:
        plt.close(fig)
        return False
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE + VB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _stage_times(study: Study) -> dict[str, float]:
    """Seconds per kind of unit, over the units this report uses (superseded ones left out)."""
    totals: dict[str, float] = defaultdict(float)
    for (kind, key), entry in study.ledger.entries.items():
        if (kind, key) in study.used:
            totals[kind] += entry.get("seconds", 0.0)
    return dict(totals)


def _miou_table(records: list[dict[str, Any]]) -> str:
    """The report's table of every (fraction, variant): mIoU over seeds and the paired difference to real-only."""
    header = ["real", "variant", "generator", "real imgs", "synthetic imgs", "mIoU w/o bg", "mIoU", "diff (points)",
              "95 % interval", "verdict", "steps kept"]
    body = []
    for r in records:
        interval = "–" if math.isnan(r["ci_low"]) or r["is_baseline"] else \
            f"[{_points(r['ci_low'])}, {_points(r['ci_high'])}]"
        body.append([f"{100 * r['real_fraction']:.0f} %", r["variant"], r["generator"], r["real_images"],
                     r["synthetic_images"], f"{_fmt(r['miou_no_bg'])} ± {_fmt(r['miou_no_bg_std'])}",
                     f"{_fmt(r['miou'])} ± {_fmt(r['miou_std'])}",
                     "baseline" if r["is_baseline"] else _points(r["diff"]), interval, verdict(r),
                     " ".join(str(step) for step in r["selected_steps"])])
    return markdown_table(header, body)


class Beside(NamedTuple):
    """The results of a `beside` config, read from this study's folder: its path, config, records and whether
    its segmenters run in bf16 here."""

    path: str
    config: StudyConfig
    records: list[dict[str, Any]]
    bf16: bool


def _protocol_line(protocol: SegmenterProtocol) -> str:
    return (f"{protocol.architecture} + {protocol.encoder} ({_start(protocol.encoder_weights)}), {protocol.steps} "
            f"steps, seeds {', '.join(map(str, protocol.seeds))}")


def _beside(beside: Sequence[Beside]) -> list[str]:
    """A section per `beside` config: its verdicts, its mIoU table and its `versus` pairings."""
    lines = []
    for item in beside:
        lines += [f"## Beside: {item.path}", "",
                  f"The same study folder read with `{item.path}` (report only): segmenter "
                  f"{_protocol_line(item.config.segmenter)}; the same real splits. Its differences pair its own "
                  "segmenters, seed by seed, as above.", ""]
        if not item.records:
            lines += ["None of its segmenters is in the ledger yet.", ""]
            continue
        lines += verdict_lines(item.records) + ["", _miou_table(item.records), ""] + _versus(item.records)
    return lines


def _variant_entries(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """summary.json's entry of each (fraction, variant)."""
    return [{**{k: r[k] for k in ("real_fraction", "variant", "generator", "miou_no_bg", "diff", "ci_low",
                                  "ci_high", "miou", "real_images", "synthetic_images", "seeds")},
             **{k: r[k] for k in ("without_sdm", "sdm_diff", "sdm_ci_low", "sdm_ci_high", "sdm_seeds") if k in r},
             **({"versus": r["versus"]} if r["versus"] else {}),
             "verdict": verdict(r)} for r in records]


def _segmenter_entry(protocol: SegmenterProtocol, bf16: bool) -> dict[str, Any]:
    return {"architecture": protocol.architecture, "encoder": protocol.encoder,
            "encoder_weights": protocol.encoder_weights, "steps": protocol.steps, "seeds": protocol.seeds,
            "bf16": bf16}


def write_report(study: Study, rows: list[dict[str, Any]], generator_runs: dict[str, dict[str, Any]], split: Split,
                 command: str, seconds: float, load_seconds: float,
                 looks: dict[float, dict[str, ImageSetLook]] | None = None,
                 beside: Sequence[Beside] = ()) -> None:
    """report.md, summary.json, results.csv and the plots, into the config's report folder (`report_dir`); with
    `beside`, other configs' results read from the same folder in sections of their own."""
    root, config = study.report_root, study.config
    root.mkdir(parents=True, exist_ok=True)
    looks = looks or {}
    records = summarize(study, rows)
    alignment = [{**a, "rougher_than_real": _rougher(study, looks, a["real_fraction"], a["generator"])}
                 for a in _alignment(study, rows)]
    write_csv(root / "results.csv", [{k: v for k, v in row.items() if k != "alignment"} for row in rows])
    _plot_differences(root / "paired_differences.png", records)
    has_curve = _plot_generator_curves(root / "generator_loss.png", study)
    grids = root / "grids"
    grids.mkdir(exist_ok=True)
    grid_links = []
    for name, run in generator_runs.items():
        source = Path(run["run_dir"]) / "grid.png"
        if source.is_file():
            target = grids / f"{name.replace('/', '_')}.png"
            shutil.copyfile(source, target)
            grid_links.append((name, target.relative_to(root).as_posix()))
    times = _stage_times(study)
    protocol = config.segmenter
    mixed = mixed_processors(rows)
    if mixed:
        study.log(f"warning: {len(mixed)} paired cells have segmenters from different processor models or "
                  f"precisions (bf16 scores differ between them, so their paired differences mix in the machines): "
                  f"{mixed[0]}"
                  + (f"; and {len(mixed) - 1} more (report.md)" if len(mixed) > 1 else ""))
    processors = sorted({name for row in rows if (name := machine(row))})
    lines = [
        f"# Low-data study: {Path(config.data_dir).name}" + (" (quick, toy size)" if config.quick else ""),
        "",
        f"- command: `{command}`" if command else "- command: (called from Python)",
        f"- data: {config.data_dir}; {len(split.val)} real validation images (model selection only), "
        + ", ".join(f"{len(s)} real training images at {100 * f:.0f} %" for f, s in split.subsets.items())
        + f"; scored on the {len(split.test)} real test images at {config.image_size} px ({config.resize_mode})",
        f"- segmenter: {protocol.architecture} + {protocol.encoder} ({_start(protocol.encoder_weights)}), "
        f"{protocol.steps} steps of batch "
        f"{protocol.batch_size}, AdamW lr {protocol.lr:g} cosine, Dice + CE, {'bf16' if study.bf16 else 'fp32'}; "
        f"weights of the best validation check (every {protocol.select_every} steps) kept; seeds "
        f"{', '.join(map(str, protocol.seeds))} (paired: the same seed starts every variant from the same weights)",
        f"- 'w/o bg' leaves out class {config.background_class}" if config.background_class is not None
        else "- no background class: 'w/o bg' is the mean over every class",
        f"- processor: {', '.join(processors) if processors else 'not recorded (a ledger from before the record)'}"
        + _threads_note(rows),
        "",
    ]
    if mixed:
        lines += ["**Warning: paired segmenters ran on different processor models or precisions.** bf16 scores "
                  "differ between CPU models, and from fp32, so these cells' paired differences mix in the machines' "
                  "difference; rerun them on one machine (delete their ledger lines) before trusting them:", ""]
        lines += [f"- {line}" for line in mixed] + [""]
    lines += [
        "## mIoU on the real test split",
        "",
        "diff = mean over seeds of (variant − real-only) with the same seed, in mIoU points without background, "
        f"with its 95 % Student-t interval. A variant helps when the whole interval is above 0, over at least "
        f"{MIN_CLAIM_SEEDS} paired seeds (with fewer it only leans up). 'steps kept': the "
        f"training step whose weights each seed kept (best on the validation split); {protocol.steps} everywhere "
        "means the segmenters were still improving when training stopped.",
        "",
    ]
    lines += [f"Verdict (a variant helps or hurts when its whole 95 % interval, over at least {MIN_CLAIM_SEEDS} paired "
              "seeds, is above or below 0):", ""]
    lines += verdict_lines(records) + [""]
    lines += [_miou_table(records), "", "![paired differences](paired_differences.png)", ""]
    lines += _sdm_share(records)
    lines += _versus(records)
    lines += _beside(beside)
    lines += ["## Per-class IoU (mean over seeds)", ""]
    lines += [markdown_table(["real", "variant"] + study.class_names,
                             [[f"{100 * r['real_fraction']:.0f} %", r["variant"]]
                              + [_fmt(r[f"iou_{n}"]) for n in study.class_names] for r in records]), ""]
    lines += ["## Label alignment", "",
              "The real-only segmenters of each fraction segment every generator's images; mIoU (w/o bg) against "
              "the masks the images were made for, beside the same segmenters on real test images. Near the real "
              "score: the images show their masks' classes where the masks put them. 'rougher than real': the "
              f"classes the generator draws more than {ROUGHER:g}x as rough as the real subset (\"Defect roughness\"); "
              "pixel noise is easy to find, so a high alignment there is no proof of realism: look at the grid.", ""]
    lines += [markdown_table(["real", "generator", "kind", "alignment mIoU w/o bg", "real test mIoU w/o bg", "seeds",
                              "rougher than real"],
                             [[f"{100 * a['real_fraction']:.0f} %", a["generator"], a["kind"],
                               _fmt(a["alignment_miou_no_bg"]), _fmt(a["real_test_miou_no_bg"]), a["seeds"],
                               "not measured" if a["rougher_than_real"] is None
                               else ", ".join(a["rougher_than_real"]) or "none"]
                              for a in alignment]) if alignment else "no generators", ""]
    lines += _look_sections(study, looks)
    lines += ["## Generator", ""]
    made = [[f"{100 * fraction:g} %", name, config.generators[name].kind,
             report_note(config.generators[name], generator_runs[f"{fraction_tag(fraction)}/{name}"])]
            for fraction in config.real_fractions for name in config.generators_at(fraction)
            if f"{fraction_tag(fraction)}/{name}" in generator_runs]
    if made:
        lines += [markdown_table(["real", "generator", "kind", "how its images were made"], made), ""]
    lines += (["![SDM training loss](generator_loss.png)", ""] if has_curve else ["no SDM in this study", ""])
    used = {name: config.generators[name] for fraction in config.real_fractions  # generators of no variant: unsaid
            for name in config.generators_at(fraction)}
    by_subset: dict[float, list[str]] = {}
    for name, generator in used.items():
        if generator.sdm_fraction is not None:
            by_subset.setdefault(generator.sdm_fraction, []).append(name)
    lines += [f"- {', '.join(names)} at every fraction from {100 * fraction:g} % up "
              f"{'samples' if len(names) == 1 else 'sample'} the SDM trained on the {100 * fraction:g} % subset "
              f"(`sdm_fraction`); every other SDM generator samples its own fraction's SDM"
              for fraction, names in by_subset.items()]
    lines += [f"- {name} samples an SDM of its own: the study's `sdm` with `{json.dumps(g.sdm)}`"
              for name, g in used.items() if g.sdm]
    lines += [""] if any(g.sdm_fraction is not None or g.sdm for g in used.values()) else []
    for name, link in grid_links:
        lines += [f"### {name}", "", "rows: mask | real image of the mask (or background) | synthetic", "",
                  f"![{name}]({link})", ""]
    lines += ["## Wall time", "",
              markdown_table(["stage", "minutes"], [[kind, f"{value / 60:.1f}"] for kind, value in times.items()]
                             + [["all stages", f"{sum(times.values()) / 60:.1f}"],
                                ["loading real data (this run)", f"{load_seconds / 60:.1f}"],
                                ["this invocation", f"{seconds / 60:.1f}"]]), "",
              "Stage times add up the units this report uses, over every invocation of the study (a resumed study "
              "counts its earlier work; superseded units are left out).", ""]
    (root / "report.md").write_text("\n".join(lines), encoding="utf-8")
    write_json(root / "summary.json", {
        "dataset": config.data_dir, "quick": config.quick, "command": command, "image_size": config.image_size,
        "segmenter": _segmenter_entry(protocol, study.bf16),
        "processors": processors, "mixed_processor_pairs": mixed,
        "background_class": config.background_class, "ignore_index": config.ignore_index,
        "variants": _variant_entries(records),
        **({"beside": [{"config": item.path, "segmenter": _segmenter_entry(item.config.segmenter, item.bf16),
                        "variants": _variant_entries(item.records)} for item in beside]} if beside else {}),
        "per_class_iou": [{"real_fraction": r["real_fraction"], "variant": r["variant"],
                           **{n: r[f"iou_{n}"] for n in study.class_names}} for r in records],
        "label_alignment": alignment,
        **{f"defect_{field}": [{"real_fraction": fraction, "images": name,
                                **{study.class_names[c]: {"mean": v.mean, "std": v.std, "images": v.images}
                                   for c, v in getattr(look, field).items()},
                                **({"off_real": _contrast_off(study, looks, fraction, name)}
                                   if field == "contrast" and name != "real" else {})}
                               for fraction, sets in looks.items() for name, look in sets.items()]
           for field in ("contrast", "roughness")},
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "seconds_this_invocation": round(seconds, 1),
    })

"""Tables and plots of an evaluation run: mean ± std over seeds, markdown and CSV, mIoU and per-class IoU plots.

Rows are plain dicts, the same as the lines of metrics.csv / alignment.csv. The std is the sample standard deviation
over seeds (n - 1 in the denominator); with one seed there is none and tables show the mean alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guided_diffusion.run_folder import markdown_table  # noqa: E402

from ..segmenter.metrics import METRIC_LABELS  # noqa: E402

TABLE_METRICS = ("miou", "miou_no_bg", "image_miou", "image_miou_no_bg", "f1_no_bg", "accuracy")
"""The metrics of the printed table (every metric is in summary.csv)."""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std of the finite values (NaN std for fewer than two)."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(finite) == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if len(finite) > 1 else math.nan


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """'0.512 ± 0.013', '0.512' without a std, 'n/a' without a mean."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(rows: Sequence[dict[str, Any]], group_by: Sequence[str], metrics: Sequence[str],
              keep: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per distinct `group_by` value (in order of first appearance) with <metric>_mean and <metric>_std.

    `keep` columns are copied from the group's first row; `seeds` counts the rows of the group.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in group_by), []).append(row)
    summary = []
    for key, members in groups.items():
        out: dict[str, Any] = dict(zip(group_by, key))
        out.update({column: members[0][column] for column in keep})
        out["seeds"] = len(members)
        for metric in metrics:
            out[f"{metric}_mean"], out[f"{metric}_std"] = mean_std([float(m[metric]) for m in members])
        summary.append(out)
    return summary


def results_table(summary: Sequence[dict[str, Any]], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """The main table: model, mix, image counts and mean ± std of the chosen metrics."""
    header = ["model", "mix", "real", "synthetic", "seeds"] + [METRIC_LABELS.get(m, m) for m in metrics]
    rows = [[row["model"], row["mix"], row["real_images"], row["synthetic_images"], row["seeds"]]
            + [format_mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics] for row in summary]
    return markdown_table(header, rows)


def per_class_table(summary: Sequence[dict[str, Any]], class_names: Sequence[str], prefix: str = "iou") -> str:
    """Per-class IoU (mean ± std) of each model and mix."""
    header = ["model", "mix"] + list(class_names)
    rows = [[row["model"], row["mix"]]
            + [format_mean_std(row[f"{prefix}_{c}_mean"], row[f"{prefix}_{c}_std"]) for c in class_names]
            for row in summary]
    return markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------------------------
# Plots


def plot_miou_vs_synthetic(path: Path, summary: Sequence[dict[str, Any]]) -> None:
    """mIoU (with and without background) against the number of synthetic images: a line per model (and per
    real-image count when the mixes use several), error bars = std over seeds."""
    real_counts = sorted({row["real_images"] for row in summary})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for axis, metric in zip(axes, ("miou", "miou_no_bg")):
        lines: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for row in summary:
            lines.setdefault((row["model"], row["real_images"]), []).append(row)
        for (model, real), rows in lines.items():
            rows = sorted(rows, key=lambda r: r["synthetic_images"])
            x = [r["synthetic_images"] for r in rows]
            y = [r[f"{metric}_mean"] for r in rows]
            err = [0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"] for r in rows]
            label = model if len(real_counts) == 1 else f"{model}, {real} real"
            axis.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        axis.set_xlabel("synthetic training images")
        axis.set_ylabel(METRIC_LABELS[metric] + " (real test split)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Does synthetic data raise mIoU?")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_per_class_iou(path: Path, summary: Sequence[dict[str, Any]], class_names: Sequence[str]) -> None:
    """Grouped bars: per-class IoU of every (model, mix), error bars = std over seeds."""
    groups = [f"{row['model']} {row['mix']}" for row in summary]
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(class_names))
    size = min(18.0, max(7.0, 2.0 + 0.9 * len(class_names) + 0.25 * len(class_names) * len(groups)))
    figure, axis = plt.subplots(figsize=(size, 4.5), constrained_layout=True)
    for i, (label, row) in enumerate(zip(groups, summary)):
        means = [row[f"iou_{c}_mean"] for c in class_names]
        stds = [0.0 if math.isnan(row[f"iou_{c}_std"]) else row[f"iou_{c}_std"] for c in class_names]
        axis.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(means), width, yerr=stds, capsize=2, label=label)
    axis.set_xticks(x, class_names, rotation=30 if len(class_names) > 6 else 0)
    axis.set_ylabel("IoU (real test split)")
    axis.set_ylim(0, 1)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncols=2)
    axis.set_title("Per-class IoU, mean over seeds")
    figure.savefig(path, dpi=110)
    plt.close(figure)

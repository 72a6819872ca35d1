"""How good are generated masks? A pure function of (generated masks, real training masks) and its files.

`mask_report` compares the two sets:
- class statistics: each class's share of all pixels, the share of masks holding it, and its objects
  (8-connected components) per mask;
- object sizes: per class, histograms of log10(component area / mask area) (relative, so sets at different
  sizes compare) and the Wasserstein-1 distance between the generated and real log sizes;
- novelty: for each generated mask that holds a class other than the background (a layout: a mask of background
  alone is no copy of anything, and defect datasets hold many of them), the IoU with its nearest training mask
  (the mean over the non-background classes either mask holds) and the share above `near_copy_iou`
  (near-copies); beside it, the share of background-only masks, generated and real;
- validity: the share of components smaller than `min_area` pixels (speckles), generated and real.
Generated masks cleaned of small components (`mask_min_area`) are compared with real masks cleaned alike
(`clean_real_below`): a real set keeps its 1-3 px specks and a cleaned set has none, so the object sizes would
differ by the cleaning alone (on magnetic-tile at 64 px, cleaning at 4 px: mean W1 0.37 against uncleaned real
masks, 0.25 against cleaned ones, where two real sets differ by 0.22).
`write_mask_report` writes masks_report.md, masks_report.json and masks_report.png into a run folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..run_folder import write_json

SIZE_BINS = np.linspace(-5.0, 0.0, 21)
"""Histogram bins of log10(component area / mask area): from 1e-5 of the mask (a pixel of a 316 px mask) to all."""
COMPARE_SIZE = 64
"""Masks are compared for novelty at this size at most (nearest neighbour): a copy stays a copy, and the IoU
matrix of a few hundred by a few thousand masks takes seconds."""


def components(mask: np.ndarray, num_classes: int, connectivity: int = 8) -> list[np.ndarray]:
    """Per class, the pixel areas of its connected components in `mask` (int64 arrays, class 0 included)."""
    mask = np.asarray(mask)
    areas = [np.zeros(0, np.int64) for _ in range(num_classes)]
    for class_id in np.unique(mask):
        count, _, stats, _ = cv2.connectedComponentsWithStats((mask == class_id).astype(np.uint8),
                                                              connectivity=connectivity)
        areas[int(class_id)] = stats[1:count, cv2.CC_STAT_AREA].astype(np.int64)
    return areas


def wasserstein_1(u: np.ndarray, v: np.ndarray) -> float | None:
    """Wasserstein-1 (earth mover's) distance between two 1-D samples: the area between their empirical CDFs.
    None when either sample is empty."""
    u, v = np.sort(np.asarray(u, np.float64)), np.sort(np.asarray(v, np.float64))
    if not len(u) or not len(v):
        return None
    points = np.sort(np.concatenate([u, v]))
    widths = np.diff(points)
    cdf_u = np.searchsorted(u, points[:-1], side="right") / len(u)
    cdf_v = np.searchsorted(v, points[:-1], side="right") / len(v)
    return float(np.sum(np.abs(cdf_u - cdf_v) * widths))


def _nearest_resize(masks: np.ndarray, size: int) -> np.ndarray:
    """N×H×W -> N×size×size by nearest neighbour at pixel centres (values never mixed)."""
    height, width = masks.shape[1:]
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return masks[:, rows[:, None], cols[None, :]]


def nearest_iou(generated: np.ndarray, real: np.ndarray, num_classes: int,
                background: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """For each generated mask (N×P flattened ids), the IoU with its nearest real mask (M×P) and that mask's index.

    The IoU of two masks is the mean, over the classes (but `background`) that either holds, of the class's
    intersection over union; two masks holding none of those classes have IoU 1."""
    iou_sum = np.zeros((len(generated), len(real)), np.float64)
    present = np.zeros_like(iou_sum)
    for class_id in range(num_classes):
        if class_id == background:
            continue
        a = (generated == class_id).astype(np.float32)
        b = (real == class_id).astype(np.float32)
        size_a, size_b = a.sum(1), b.sum(1)
        if not size_a.any() and not size_b.any():
            continue
        intersection = (a @ b.T).astype(np.float64)
        union = size_a[:, None] + size_b[None, :] - intersection
        holds = union > 0
        iou_sum += np.where(holds, intersection / np.maximum(union, 1), 0.0)
        present += holds
    iou = np.where(present > 0, iou_sum / np.maximum(present, 1), 1.0)
    nearest = iou.argmax(1)
    return iou[np.arange(len(generated)), nearest], nearest


def _holds_a_layout(flat_masks: np.ndarray, background: int | None) -> np.ndarray:
    """Per mask (N×P flattened ids): does it hold a class other than `background` (always, with no background)?"""
    if background is None:
        return np.ones(len(flat_masks), bool)
    return (flat_masks != background).any(axis=1)


def _set_statistics(masks: Sequence[np.ndarray], num_classes: int, min_area: int) -> dict[str, Any]:
    pixels = np.zeros(num_classes, np.int64)
    holding = np.zeros(num_classes, np.int64)
    objects = np.zeros(num_classes, np.int64)
    log_sizes: list[list[float]] = [[] for _ in range(num_classes)]
    speckles = total = 0
    for mask in masks:
        mask = np.asarray(mask)
        counts = np.bincount(mask.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
        pixels += counts
        holding += counts > 0
        for class_id, areas in enumerate(components(mask, num_classes)):
            objects[class_id] += len(areas)
            log_sizes[class_id] += np.log10(areas / mask.size).tolist()
            speckles += int((areas < min_area).sum())
            total += len(areas)
    count = max(len(masks), 1)
    return {"pixel_share": pixels / max(pixels.sum(), 1), "holding_share": holding / count,
            "objects_per_mask": objects / count, "log_sizes": log_sizes, "speckles": speckles, "components": total}


def remove_small_components(mask: np.ndarray, min_area: int, connectivity: int = 8, passes: int = 3) -> np.ndarray:
    """The H×W mask with every connected component (of any class, background too) of fewer than `min_area`
    pixels filled with the most common class around it (its 1-pixel ring). A component that fills the image is
    kept. Smallest components are filled first; up to `passes` passes, as a fill can leave a new small one."""
    mask = np.array(mask, copy=True)
    if min_area <= 1:
        return mask
    for _ in range(passes):
        small = []
        for class_id in np.unique(mask):
            count, labels, stats, _ = cv2.connectedComponentsWithStats((mask == class_id).astype(np.uint8),
                                                                       connectivity=connectivity)
            for j in range(1, count):
                if stats[j, cv2.CC_STAT_AREA] < min_area:
                    small.append((int(stats[j, cv2.CC_STAT_AREA]), labels, j, stats[j]))
        if not small:
            break
        changed = False
        for _, labels, j, (left, top, width, height, _) in sorted(small, key=lambda item: item[0]):
            y0, y1 = max(top - 1, 0), min(top + height + 1, mask.shape[0])
            x0, x1 = max(left - 1, 0), min(left + width + 1, mask.shape[1])
            inside = labels[y0:y1, x0:x1] == j
            ring = cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~inside
            around = mask[y0:y1, x0:x1][ring]
            if around.size == 0:
                continue
            values, counts = np.unique(around, return_counts=True)
            mask[y0:y1, x0:x1][inside] = values[np.argmax(counts)]
            changed = True
        if not changed:
            break
    return mask


def _round(values, digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def mask_report(generated: Sequence[np.ndarray], real: Sequence[np.ndarray], num_classes: int, *, min_area: int = 4,
                background: int | None = 0, near_copy_iou: float = 0.9, class_names: Sequence[str] | None = None,
                compare_size: int | None = COMPARE_SIZE, clean_real_below: int = 0) -> dict[str, Any]:
    """The mask quality report (a JSON-ready dict) of `generated` against the `real` training masks (H×W class
    ids each; every mask of a set the same size). `clean_real_below` > 1: the real masks are first cleaned as
    the generated ones were (`remove_small_components`). See the module docstring for what it holds."""
    if not len(generated) or not len(real):
        raise ValueError(f"mask_report needs generated and real masks, got {len(generated)} and {len(real)}")
    if clean_real_below > 1:
        real = [remove_small_components(np.asarray(m), clean_real_below) for m in real]
    names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    gen_stats = _set_statistics(generated, num_classes, min_area)
    real_stats = _set_statistics(real, num_classes, min_area)

    gen_array, real_array = np.stack([np.asarray(m) for m in generated]), np.stack([np.asarray(m) for m in real])
    size = min(compare_size or 10**9, *gen_array.shape[1:], *real_array.shape[1:])
    if gen_array.shape[1:] != (size, size):
        gen_array = _nearest_resize(gen_array, size)
    if real_array.shape[1:] != (size, size):
        real_array = _nearest_resize(real_array, size)
    gen_flat, real_flat = gen_array.reshape(len(gen_array), -1), real_array.reshape(len(real_array), -1)
    layouts = np.flatnonzero(_holds_a_layout(gen_flat, background))
    iou, nearest = nearest_iou(gen_flat[layouts], real_flat, num_classes, background)

    sizes = {}
    for class_id, name in enumerate(names):
        g, r = gen_stats["log_sizes"][class_id], real_stats["log_sizes"][class_id]
        w1 = wasserstein_1(g, r)
        sizes[name] = {"w1_log10_size": None if w1 is None else round(w1, 6),
                       "generated_objects": len(g), "real_objects": len(r),
                       "generated_hist": np.histogram(np.clip(g, SIZE_BINS[0], 0), SIZE_BINS)[0].tolist(),
                       "real_hist": np.histogram(np.clip(r, SIZE_BINS[0], 0), SIZE_BINS)[0].tolist()}

    def share(stats: dict) -> float:
        return round(stats["speckles"] / stats["components"], 6) if stats["components"] else 0.0

    return {
        "num_generated": len(generated), "num_real": len(real), "class_names": names,
        "pixel_share": {"generated": _round(gen_stats["pixel_share"]), "real": _round(real_stats["pixel_share"])},
        "holding_share": {"generated": _round(gen_stats["holding_share"]),
                          "real": _round(real_stats["holding_share"])},
        "objects_per_mask": {"generated": _round(gen_stats["objects_per_mask"]),
                             "real": _round(real_stats["objects_per_mask"])},
        "object_sizes": {"measure": "log10(component area / mask area), 8-connected components",
                         "bins": _round(SIZE_BINS, 3), "classes": sizes},
        "novelty": {"compared": len(layouts), "generated_index": layouts.tolist(),
                    "iou_with_nearest": _round(iou), "nearest_real": nearest.tolist(),
                    "mean_iou": round(float(iou.mean()), 6) if len(iou) else None,
                    "median_iou": round(float(np.median(iou)), 6) if len(iou) else None,
                    "near_copy_iou": near_copy_iou,
                    "near_copy_share": round(float((iou > near_copy_iou).mean()), 6) if len(iou) else None,
                    "background_only_share": {
                        "generated": round(1.0 - len(layouts) / len(gen_flat), 6),
                        "real": round(1.0 - float(_holds_a_layout(real_flat, background).mean()), 6)},
                    "compared_at": size, "background": background},
        "validity": {"min_area": min_area, "real_cleaned_below": clean_real_below if clean_real_below > 1 else 0,
                     "speckle_share_generated": share(gen_stats),
                     "speckle_share_real": share(real_stats),
                     "components_generated": gen_stats["components"], "components_real": real_stats["components"]},
    }


def novelty_summary(novelty: dict[str, Any], num_generated: int) -> str:
    """One sentence on the novelty of `num_generated` masks: how many hold a layout, their nearest-IoU and
    near-copy share, and the background-only shares."""
    alone = novelty["background_only_share"]
    only = (f"{100 * alone['generated']:.0f}% hold the background only (real training masks "
            f"{100 * alone['real']:.0f}%)")
    if not novelty["compared"]:
        return f"No generated mask holds a class other than the background: {only}; novelty not measured."
    return (f"{novelty['compared']} of {num_generated} generated masks hold a class other than the background "
            f"({only}); their IoU with the nearest training mask: mean {novelty['mean_iou']:.3f}, median "
            f"{novelty['median_iou']:.3f}; near-copies (IoU > {novelty['near_copy_iou']:g}): "
            f"{100 * novelty['near_copy_share']:.1f}%")


def markdown(report: dict[str, Any]) -> str:
    """masks_report.md: the report's tables."""
    names = report["class_names"]
    novelty, validity = report["novelty"], report["validity"]
    cleaned = validity.get("real_cleaned_below", 0)
    lines = [
        "# Generated masks",
        "",
        f"{report['num_generated']} generated masks against {report['num_real']} real training masks"
        + (f", both cleaned of components under {cleaned} pixels (mask_min_area)." if cleaned else "."),
        "",
        "| class | pixel share gen | real | masks holding it gen | real | objects/mask gen | real | "
        "W1 log10 size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, name in enumerate(names):
        w1 = report["object_sizes"]["classes"][name]["w1_log10_size"]
        lines.append(
            f"| {k} {name} | {100 * report['pixel_share']['generated'][k]:.2f}% | "
            f"{100 * report['pixel_share']['real'][k]:.2f}% | {100 * report['holding_share']['generated'][k]:.0f}% | "
            f"{100 * report['holding_share']['real'][k]:.0f}% | {report['objects_per_mask']['generated'][k]:.2f} | "
            f"{report['objects_per_mask']['real'][k]:.2f} | {'—' if w1 is None else f'{w1:.3f}'} |")
    lines += [
        "",
        f"Object sizes: {report['object_sizes']['measure']}; W1 = Wasserstein-1 distance between the generated and "
        "real log sizes of a class (0 = same distribution, 1 = a factor 10 apart; — = no objects on one side).",
        "",
        "## Novelty",
        "",
        novelty_summary(novelty, report["num_generated"]) + f" (compared at {novelty['compared_at']} px; the IoU "
        "of two masks is the mean over the non-background classes either holds).",
        "",
        "## Validity",
        "",
        f"Speckles (components under {validity['min_area']} pixels): {100 * validity['speckle_share_generated']:.1f}% "
        f"of {validity['components_generated']} generated components, "
        f"{100 * validity['speckle_share_real']:.1f}% of {validity['components_real']} real ones.",
        "",
        "Plots: masks_report.png (class shares, objects per mask, object sizes per class, novelty).",
        "",
    ]
    return "\n".join(lines)


def write_mask_report(run_dir: str | Path, report: dict[str, Any]) -> None:
    """masks_report.md, masks_report.json and masks_report.png in `run_dir`."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    run_dir = Path(run_dir)
    write_json(run_dir / "masks_report.json", report)
    (run_dir / "masks_report.md").write_text(markdown(report), encoding="utf-8")
    names = report["class_names"]
    shown = [n for n in names if report["object_sizes"]["classes"][n]["generated_objects"]
             or report["object_sizes"]["classes"][n]["real_objects"]]
    columns = max(4, len(shown))
    figure = Figure(figsize=(3.2 * columns, 6.4), dpi=100)
    axes = figure.subplots(2, columns, squeeze=False)
    positions = np.arange(len(names))
    for ax, key, label in ((axes[0, 0], "pixel_share", "pixel share (%)"),
                           (axes[0, 1], "holding_share", "masks holding the class (%)"),
                           (axes[0, 2], "objects_per_mask", "objects per mask")):
        scale = 1 if key == "objects_per_mask" else 100
        ax.bar(positions - 0.2, [scale * v for v in report[key]["real"]], 0.4, label="real")
        ax.bar(positions + 0.2, [scale * v for v in report[key]["generated"]], 0.4, label="generated")
        ax.set_xticks(positions, names, rotation=45, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    novelty = report["novelty"]
    axes[0, 3].hist(novelty["iou_with_nearest"], bins=np.linspace(0, 1, 21), color="tab:green")
    axes[0, 3].axvline(novelty["near_copy_iou"], color="black", linestyle="--", linewidth=1)
    copies = "—" if novelty["near_copy_share"] is None else f"{100 * novelty['near_copy_share']:.1f}%"
    axes[0, 3].set_title(f"IoU with the nearest training mask\nnear-copies {copies}", fontsize=9)
    for j in range(4, columns):
        axes[0, j].axis("off")
    bins = np.asarray(report["object_sizes"]["bins"])
    centres = (bins[:-1] + bins[1:]) / 2
    for j in range(columns):
        ax = axes[1, j]
        if j >= len(shown):
            ax.axis("off")
            continue
        entry = report["object_sizes"]["classes"][shown[j]]
        for side, colour in (("real", "tab:blue"), ("generated", "tab:orange")):
            counts = np.asarray(entry[f"{side}_hist"], np.float64)
            ax.step(centres, counts / max(counts.sum(), 1), where="mid", color=colour, label=side)
        w1 = entry["w1_log10_size"]
        ax.set_title(f"{shown[j]} object sizes, W1 {'—' if w1 is None else f'{w1:.2f}'}", fontsize=9)
        ax.set_xlabel("log10(area / mask area)", fontsize=7)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(run_dir / "masks_report.png")

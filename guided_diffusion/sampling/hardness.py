"""Hardness-aware mask selection for `main.py sample` (the `hardness_args` key), FreeMask's re-sampling.

A segmenter learns little from more images of what it already segments well. FreeMask synthesises more images
for the masks that are hard. Here a mask's hardness is what evaluation/freemask.py measures: the loss of the
scorer (a segmenter trained on the real train split, cached by dataset hash) on the mask's real image, averaged
per class present. Masks are then drawn in proportion to weight = (hardness / mean hardness)^exponent:
exponent 0 = all masks alike, 1 = in proportion to hardness, larger = harder masks still more often.

With balance_args as well, the class balance comes first and hardness second: the greedy water-filling of
balance.py still decides which class is fed next and which masks can lower the imbalance, but among those it
multiplies each mask's gain by its weight before dividing by the reuse factor (1 + uses). So of two masks that
help the balance alike, the one k times heavier is used about k times as often, and the balance reached is the
same as without hardness whenever the candidates allow it. An augmented mask weighs what its source mask does.

Without balance_args, num_samples masks are drawn at random with replacement with probabilities proportional to
the weights (seeded by `seed`). `hardness.json` and `hardness.png` in the run folder show the candidates'
hardness and what was chosen.

The scorer is not this module's: it is a segmenter of evaluation/, and guided_diffusion never imports the
evaluation package (the layers import one way; tests/test_layers.py checks it). So the hardness is measured by a
`MeasureHardness` function handed in by the caller, `evaluation.freemask.measure_hardness` (which loads the
cached scorer, or trains it: with several processes rank 0 alone, then every rank loads it): main.py and the
study pass it to the sample action, which passes it here. This module keeps what is sampling's own: the weights,
the draw, the reports. Passing the function in, rather than the hardness values, keeps the candidates where
they are made (mask_split, the checkpoint's split, inpainting's defect candidates) and measures nothing when
hardness_args is off; passing it in, rather than registering it on import, keeps the dependency visible in the
call and the lower layer's behaviour independent of what else was imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..balance import write_report
from ..config import HardnessArgs, SampleConfig  # HardnessArgs: the hardness_args keys, with the others in config.py
from ..data import Pair
from ..run_folder import write_json

HISTOGRAM_BINS = 20

MeasureHardness = Callable[[SampleConfig, Sequence[Pair], Callable[[str], None]], tuple[np.ndarray, dict[str, Any]]]
"""measure(config, candidate pairs, log) -> (the hardness of each pair, what the report records of the scorer);
config.hardness_args is set. evaluation.freemask.measure_hardness is the one the callers pass."""


def hardness_weights(hardness: Sequence[float] | np.ndarray, exponent: float) -> np.ndarray:
    """(hardness / mean hardness)^exponent per mask (mean weight about 1 for exponent 1).

    A hardness is floored at a thousandth of the mean, so no mask gets weight 0 (or infinity for a negative
    power) from a loss that rounds to zero."""
    hardness = np.asarray(hardness, np.float64)
    if hardness.size == 0:
        return hardness
    mean = max(float(hardness.mean()), 1e-12)
    relative = np.maximum(hardness, 1e-3 * mean) / mean
    return relative ** float(exponent)


def draw_by_hardness(weights: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """num_samples candidate indices drawn with replacement, with probabilities proportional to `weights`."""
    weights = np.asarray(weights, np.float64)
    if weights.size == 0 or not weights.sum() > 0:
        raise ValueError("draw_by_hardness needs at least one candidate of positive weight")
    rng = np.random.default_rng([seed, 4])
    return rng.choice(len(weights), size=num_samples, replace=True, p=weights / weights.sum())


@dataclass(frozen=True)
class MaskHardness:
    """The candidates' hardness and weights, and the scorer that measured them."""

    stems: tuple[str, ...]
    hardness: np.ndarray
    weights: np.ndarray
    exponent: float
    scorer: dict[str, Any]

    def report(self, uses: np.ndarray, augmented: int = 0, with_balance: bool = False) -> dict[str, Any]:
        """hardness.json: how hard the candidates are and how often each was chosen (`uses`, per candidate;
        `augmented` images used augmented masks)."""
        uses = np.asarray(uses, np.int64)
        chosen = int(uses.sum())
        edges = np.histogram_bin_edges(self.hardness, bins=HISTOGRAM_BINS) if len(self.hardness) else np.zeros(1)
        candidates_histogram, _ = np.histogram(self.hardness, bins=edges)
        chosen_histogram, _ = np.histogram(self.hardness, bins=edges, weights=uses)
        order = np.argsort(-self.hardness, kind="stable")
        rule = ("greedy class balancing; among masks that help the balance alike, each mask's gain is multiplied by "
                "its weight" if with_balance else "masks drawn at random with replacement, probability proportional "
                                                  "to the weight")
        return {
            "hardness": "mean over the classes in the mask of the scorer's mean pixel cross-entropy on the real "
                        "image (evaluation/freemask.py)",
            "weight": f"(hardness / mean hardness)^{self.exponent:g}",
            "selection": rule,
            "exponent": self.exponent,
            "scorer": self.scorer,
            "candidates": len(self.stems),
            "images": chosen + augmented,
            "images_from_augmented_masks": augmented,
            "distinct_masks_used": int((uses > 0).sum()),
            "mean_hardness_candidates": _rounded(self.hardness.mean()) if len(self.hardness) else None,
            "mean_hardness_chosen": _rounded((self.hardness * uses).sum() / chosen) if chosen else None,
            "histogram": {"edges": [_rounded(e) for e in edges], "candidates": candidates_histogram.tolist(),
                          "chosen": [int(v) for v in chosen_histogram]},
            "masks": [{"stem": self.stems[i], "hardness": _rounded(self.hardness[i]),
                       "weight": _rounded(self.weights[i]), "uses": int(uses[i])} for i in order],
        }


def _rounded(value: float) -> float:
    return round(float(value), 6)


def weigh_by_hardness(config: SampleConfig, pairs: Sequence[Pair], measure: MeasureHardness | None,
                      log: Callable[[str], None] = print) -> MaskHardness:
    """The hardness of each candidate pair, measured by `measure` (see the module docstring), and its weight."""
    if measure is None:
        raise ValueError("hardness_args is set but no MeasureHardness was passed: pass "
                         "evaluation.freemask.measure_hardness (main.py and the study do)")
    args = config.hardness_args or HardnessArgs()
    hardness, scorer = measure(config, pairs, log)
    hardness = np.asarray(hardness, np.float64)
    weights = hardness_weights(hardness, args.exponent)
    log(f"hardness_args: hardness of the {len(pairs)} candidate masks {hardness.min():.3f}..{hardness.max():.3f} "
        f"(mean {hardness.mean():.3f}); weights (hardness / mean)^{args.exponent:g} "
        f"{weights.min():.2f}..{weights.max():.2f}")
    return MaskHardness(tuple(p.stem for p in pairs), hardness, weights, args.exponent, scorer)


def uses_of(pairs: Sequence[Pair], chosen_pairs: Sequence[Pair | None]) -> tuple[np.ndarray, int]:
    """How often each candidate pair was chosen, and how many choices were augmented masks (pair None)."""
    position = {pair: i for i, pair in enumerate(pairs)}
    uses = np.zeros(len(pairs), np.int64)
    augmented = 0
    for pair in chosen_pairs:
        if pair is None or pair not in position:
            augmented += 1
        else:
            uses[position[pair]] += 1
    return uses, augmented


def write_hardness_report(run_dir: str | Path, report: dict[str, Any]) -> None:
    """hardness.json and hardness.png (the share of candidates and of chosen images per hardness bin)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    run_dir = Path(run_dir)
    write_json(run_dir / "hardness.json", report)
    histogram = report["histogram"]
    edges = np.asarray(histogram["edges"], np.float64)
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if len(edges) > 1:
        for key, label, colour in (("candidates", f"candidate masks ({report['candidates']})", "tab:gray"),
                                   ("chosen", f"sampled images ({report['images']})", "tab:red")):
            counts = np.asarray(histogram[key], np.float64)
            share = 100 * counts / max(counts.sum(), 1)
            axes.stairs(share, edges, label=label, color=colour, fill=key == "candidates", alpha=0.6)
        for key, colour in (("mean_hardness_candidates", "tab:gray"), ("mean_hardness_chosen", "tab:red")):
            if report[key] is not None:
                axes.axvline(report[key], color=colour, linestyle="--")
    axes.set_xlabel("hardness (scorer loss, mean over the classes in the mask)")
    axes.set_ylabel("share (%)")
    axes.set_title(f"hardness; weight {report['weight']}; dashed = means", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run_dir / "hardness.png")


def write_selection_reports(run_dir: str | Path, report: dict[str, Any] | None) -> None:
    """The reports of a mask selection: balance.json/.png when balancing, hardness.json/.png with hardness."""
    if not report:
        return
    hardness = report.get("hardness")
    if hardness is not None:
        write_hardness_report(run_dir, hardness)
    balance_part = {key: value for key, value in report.items() if key != "hardness"}
    if balance_part:
        write_report(run_dir, balance_part)

"""Class-balanced mask selection and mask augmentation for `main.py sample` (the `balance_args` key).

Users synthesise data because some defect classes are rare. With `balance_args` the masks to sample are not
taken in dataset order but chosen so that the classes that take part (all classes minus `ejection_classes`)
end up with nearly equal shares of the counted quantity (pixels, or objects = 8-connected components per
class), over the synthetic set alone or over real + synthetic.

Relative difference, as in ISDM: over the participating classes' counts c_k,

    relative difference = (max c - min c) / min c        (infinite when a class has none)

and the request is met when it is at most `max_class_dif`; the same as max share <= (1 + max_class_dif) x min
share, for shares taken over the participating classes only.

The selection is a greedy water-filling over the candidate masks (the `mask_split` masks, counted at the
sampling image_size): each step feeds the class that is currently smallest with the mask that lowers the
imbalance the most, where a mask already used u times counts 1 + u times less (so the masks take turns), and
exact ties go by a seeded order. If that varied selection misses the balance, the reuse penalty is lowered step
by step down to none (the masks richest in the short classes may then repeat) and the most balanced selection
is kept. It always returns exactly num_samples masks, in an order fixed by the seed. When the masks cannot
reach the balance and `use_mask_augmentation` is on, new masks are made from the existing ones (flips and
90-degree turns, small affine + elastic warps, and rare-class components pasted onto background pixels) and
the selection is made again with them. A request that cannot be met ends with the best selection found and
one warning line, never with an error or an endless loop.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config import BalanceArgs, SampleConfig  # BalanceArgs: the balance_args keys, with the others in config.py
from .config_io import within
from .data import Pair, load_mask, read_class_names, resize_pair
from .run_folder import write_json

REUSE_PENALTIES = (1.0, 0.5, 0.25)
"""A mask used u times counts (1 + penalty x u) times less: it must be that much better to be reused. The first
penalty keeps the selection varied; when it cannot reach the balance, the smaller ones are tried in turn and the
most balanced result is kept. There is no penalty 0 on purpose: at 0 the one or two masks richest in the short
classes are repeated hundreds of times (500 images from 2 masks on magnetic-tile by pixel count), and a
segmenter learns less from that than from a less balanced but varied set. The warning then says how far the
balance got; use_mask_augmentation adds new masks of the short classes."""
AUGMENTED_START_USES = 1
"""Augmented masks start as if used once, so a real mask is preferred to an augmented one that does as well."""
MAX_PASTED_COMPONENTS = 4
"""A pasted mask receives 1 to this many components of the rare class."""
MIN_AUGMENTED_PER_CLASS, MAX_AUGMENTED_PER_CLASS = 32, 256
"""Augmented candidates made per class that is short: num_samples, clamped to this range."""
WARPS_PER_SOURCE = 2
"""Affine + elastic variants made of each source mask of a short class."""
SHARE_SETS = ("real", "unbalanced", "selected", "real+unbalanced", "real+selected")
"""The count sets the report compares: the real train masks, the synthetic masks without and with
balancing, and each synthetic set added to the real one."""


# ---------------------------------------------------------------------------------------------------------------
# Counting


def load_masks(pairs: Sequence[Pair], image_size: int, dataset_mode: str, resize_mode: str) -> list[np.ndarray]:
    """Each pair's mask as sampling sees it: resized by `resize_pair` to image_size (uint8, or int32 for class
    ids above 255), so counts are of what is sampled. A blank stand-in image replaces the photo, which is
    neither needed nor read."""

    def one(pair: Pair) -> np.ndarray:
        mask = load_mask(pair.mask, dataset_mode)
        _, resized = resize_pair(np.zeros(mask.shape + (3,), np.uint8), mask, image_size, resize_mode)
        return resized.astype(np.uint8 if resized.max(initial=0) < 256 else np.int32)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        return list(pool.map(one, pairs))


def count_classes(mask: np.ndarray, num_classes: int, by_pixels: bool) -> np.ndarray:
    """Per class id: its pixels, or its objects (8-connected components), in one mask (int64, num_classes)."""
    pixels = np.bincount(np.asarray(mask).ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    if by_pixels:
        return pixels.astype(np.int64)
    objects = np.zeros(num_classes, np.int64)
    for class_id in np.flatnonzero(pixels):
        labels, _ = cv2.connectedComponents((mask == class_id).astype(np.uint8), connectivity=8)
        objects[class_id] = labels - 1
    return objects


def count_all(masks: Sequence[np.ndarray], num_classes: int, by_pixels: bool) -> np.ndarray:
    """count_classes of every mask, stacked (int64, len(masks) x num_classes)."""
    rows = [count_classes(mask, num_classes, by_pixels) for mask in masks]
    return np.stack(rows) if rows else np.zeros((0, num_classes), np.int64)


def relative_difference(counts: np.ndarray) -> float:
    """(max - min) / min of the counts of the participating classes: 0 when balanced (or one class), infinite
    when some class has none."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size <= 1:
        return 0.0
    low, high = counts.min(), counts.max()
    if low <= 0:
        return float("inf")
    return float((high - low) / low)


def shares(counts: np.ndarray) -> np.ndarray:
    """Each participating class's fraction of the total (zeros when there is nothing)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


# ---------------------------------------------------------------------------------------------------------------
# The greedy selection


def _imbalance(totals: np.ndarray) -> np.ndarray:
    """The smooth stand-in the greedy lowers: sum over classes of (1 - c_k / max c)^2, per row of `totals`.

    It is 0 when all classes are equal and reaches its largest value, the number of classes, when there is
    nothing; every class short of the largest one adds to it, the shortest the most."""
    top = np.maximum(totals.max(axis=-1, keepdims=True), 1e-300)  # an all-zero row: every deficit is 1
    deficits = 1.0 - totals / top
    return np.einsum("...k,...k->...", deficits, deficits)


def _best(gain: np.ndarray, uses: np.ndarray, rank: np.ndarray, reuse_penalty: float,
          weight: np.ndarray | float = 1.0) -> int:
    """The position of the best candidate: the largest gain divided by (1 + reuse_penalty x uses), or for a
    loss the smallest loss multiplied by it; exact ties go to the least used, then to the seeded rank.

    `weight` (hardness_args: hardness^exponent relative to the mean) multiplies a gain and divides a loss, so
    that of two masks that help the balance alike the harder one is chosen, and reused as often as it is
    harder (the reuse factor grows with each use). A weight of 1 leaves every score unchanged."""
    factor = (1.0 + reuse_penalty * uses) / weight
    score = np.where(gain > 0, gain / factor, gain * factor)
    tied = score == score.max()
    return int(np.argmin(np.where(tied, uses * (rank.max() + 1) + rank, np.inf)))


def greedy_selection(counts: np.ndarray, start: np.ndarray, num_samples: int, seed: int,
                     initial_uses: np.ndarray | None = None, reuse_penalty: float = REUSE_PENALTIES[0],
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Choose num_samples rows of `counts` (candidates x participating classes), repetition allowed, so that
    start + their sum is balanced; returns the chosen row indices in the order chosen.

    Water-filling: each step takes the smallest class (ties in a seeded class order) that some candidate can
    feed while lowering `_imbalance`, and picks among those candidates the one with the largest decrease
    divided by (1 + reuse_penalty x uses). When no candidate lowers the imbalance (balanced already, or every
    choice overshoots), it takes the least harmful one, a harm multiplied by the same factor. A step usually
    looks only at the candidates holding the smallest class: a vectorised pass over a fraction of them."""
    counts = np.asarray(counts, dtype=np.float64)
    num_candidates, num_classes = counts.shape
    if num_candidates == 0:
        raise ValueError("greedy_selection needs at least one candidate")
    rng = np.random.default_rng(seed)
    rank = rng.permutation(num_candidates).astype(np.float64)
    class_rank = rng.permutation(num_classes)
    uses = np.zeros(num_candidates) if initial_uses is None else np.asarray(initial_uses, np.float64).copy()
    weights = np.ones(num_candidates) if weights is None else np.asarray(weights, np.float64)
    feeders = [np.flatnonzero(counts[:, k] > 0) for k in range(num_classes)]
    current = np.asarray(start, dtype=np.float64).copy()
    chosen = np.empty(num_samples, dtype=np.int64)
    for step in range(num_samples):
        now = _imbalance(current)
        for class_index in np.lexsort((class_rank, current)):
            rows = feeders[class_index]
            gain = now - _imbalance(current + counts[rows])
            improving = gain > 1e-12
            if improving.any():
                rows, gain = rows[improving], gain[improving]
                pick = rows[_best(gain, uses[rows], rank[rows], reuse_penalty, weights[rows])]
                break
        else:
            pick = _best(now - _imbalance(current + counts), uses, rank, reuse_penalty, weights)
        chosen[step] = pick
        current += counts[pick]
        uses[pick] += 1
    return chosen


def most_balanced_selection(counts: np.ndarray, start: np.ndarray, num_samples: int, seed: int,
                            max_class_dif: float, initial_uses: np.ndarray | None = None,
                            weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """greedy_selection with each of REUSE_PENALTIES in turn: the first (most varied) selection that is within
    max_class_dif, else the most balanced one (ties keep the more varied). Returns it and its reuse penalty."""
    best, best_penalty, best_difference = None, REUSE_PENALTIES[0], np.inf
    for penalty in REUSE_PENALTIES:
        picked = greedy_selection(counts, start, num_samples, seed, initial_uses, penalty, weights)
        difference = relative_difference(start + counts[picked].sum(0))
        if best is None or difference < best_difference:
            best, best_penalty, best_difference = picked, penalty, difference
        if difference <= max_class_dif:
            break
    return best, best_penalty


# ---------------------------------------------------------------------------------------------------------------
# Mask augmentation

_SQUARE_ONLY = ("rot90", "rot270", "transpose", "antitranspose")
DIHEDRAL = ("hflip", "vflip", "rot180") + _SQUARE_ONLY
"""The flips and 90-degree turns; the last four keep the size only for square masks."""


def dihedral(mask: np.ndarray, kind: str) -> np.ndarray:
    """A flip or 90-degree turn of a mask (exact: no pixel is interpolated)."""
    ops = {"hflip": lambda m: m[:, ::-1], "vflip": lambda m: m[::-1, :], "rot180": lambda m: m[::-1, ::-1],
           "rot90": lambda m: np.rot90(m, 1), "rot270": lambda m: np.rot90(m, 3), "transpose": lambda m: m.T,
           "antitranspose": lambda m: np.rot90(m, 2).T}
    return np.ascontiguousarray(ops[kind](mask))


def warp(mask: np.ndarray, rng: np.random.Generator, max_degrees: float = 10.0, max_scale: float = 0.1,
         max_shift: float = 0.04, elastic: float = 0.02) -> np.ndarray:
    """A small affine change (rotation, scale, shift) plus a smooth elastic displacement of a whole mask.

    Nearest-neighbour sampling keeps class ids exact; pixels that come from outside the mask become class 0.
    The elastic field is a 4x4 grid of random offsets (up to `elastic` x size) upsampled bicubically."""
    height, width = mask.shape
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    scale = rng.uniform(1.0 - max_scale, 1.0 + max_scale)
    shift_y, shift_x = rng.uniform(-max_shift, max_shift, 2) * (height, width)
    grid = rng.uniform(-1.0, 1.0, (2, 4, 4)).astype(np.float32) * elastic * max(height, width)
    field_y = cv2.resize(grid[0], (width, height), interpolation=cv2.INTER_CUBIC)
    field_x = cv2.resize(grid[1], (width, height), interpolation=cv2.INTER_CUBIC)
    out_y, out_x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # pixel centres
    dy, dx = out_y - height / 2 - shift_y, out_x - width / 2 - shift_x
    cos, sin = np.cos(angle), np.sin(angle)
    source_y = (cos * dy + sin * dx) / scale + height / 2 + field_y
    source_x = (-sin * dy + cos * dx) / scale + width / 2 + field_x
    rows, cols = np.floor(source_y).astype(np.int64), np.floor(source_x).astype(np.int64)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    out = np.zeros_like(mask)
    out[inside] = mask[rows[inside], cols[inside]]
    return out


def components(mask: np.ndarray, class_id: int) -> list[np.ndarray]:
    """The 8-connected components of one class, each as a tight boolean crop."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask == class_id).astype(np.uint8), connectivity=8)
    crops = []
    for label in range(1, count):
        x, y, w, h = stats[label, :4]
        crops.append(labels[y:y + h, x:x + w] == label)
    return crops


def _random_place(background: np.ndarray, footprint: np.ndarray, rng: np.random.Generator,
                  tries: int = 32) -> tuple[int, int] | None:
    """A random top-left corner where the whole footprint lies on background, or None when there is none.

    A few random corners are tried first (masks are mostly background, so one usually fits at once); then every
    corner is found by one erosion of the background with the footprint, and one of them is drawn."""
    spare_rows = background.shape[0] - footprint.shape[0] + 1
    spare_cols = background.shape[1] - footprint.shape[1] + 1
    for _ in range(tries):
        top, left = int(rng.integers(spare_rows)), int(rng.integers(spare_cols))
        if background[top:top + footprint.shape[0], left:left + footprint.shape[1]][footprint].all():
            return top, left
    # erode with the footprint anchored at its top-left corner: 1 where it fits (outside the mask counts as 0)
    room = cv2.erode(background.astype(np.uint8), footprint.astype(np.uint8), anchor=(0, 0),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0)[:spare_rows, :spare_cols]
    rows, cols = np.nonzero(room)
    if len(rows) == 0:
        return None
    where = int(rng.integers(len(rows)))
    return int(rows[where]), int(cols[where])


def paste_components(host: np.ndarray, pieces: Sequence[np.ndarray], class_id: int, count: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Paste `count` randomly chosen, flipped or turned pieces of `class_id` onto the host's class-0 pixels.

    A piece lands only where it and a 1-pixel ring around it are all class 0 (inside the mask), so it never
    covers another class's pixels and stays a separate object; a piece with no room is skipped. Returns the new
    mask and how many pieces landed."""
    out = host.copy()
    landed = 0
    for _ in range(count):
        piece = dihedral(pieces[int(rng.integers(len(pieces)))], DIHEDRAL[int(rng.integers(len(DIHEDRAL)))])
        footprint = cv2.dilate(np.pad(piece, 1).astype(np.uint8), np.ones((3, 3), np.uint8))
        if footprint.shape[0] > out.shape[0] or footprint.shape[1] > out.shape[1]:
            continue
        place = _random_place(out == 0, footprint.astype(bool), rng)
        if place is None:
            continue
        top, left = place[0] + 1, place[1] + 1
        window = out[top:top + piece.shape[0], left:left + piece.shape[1]]
        window[piece] = class_id
        landed += 1
    return out, landed


@dataclass(frozen=True)
class Augmentation:
    """A recipe for one new mask, made again from it on demand (so only the chosen masks are kept)."""

    kind: str  # a DIHEDRAL name, "warp" or "paste"
    source: int  # the mask it starts from (for "paste": the host) in the list of source masks
    class_id: int  # the short class it was made for (the class pasted, for "paste")
    seed: int


def make_augmented(recipe: Augmentation, masks: Sequence[np.ndarray],
                   pieces: dict[int, list[np.ndarray]]) -> np.ndarray:
    """The mask a recipe describes; the same every time."""
    rng = np.random.default_rng(recipe.seed)
    source = masks[recipe.source]
    if recipe.kind == "warp":
        return warp(source, rng)
    if recipe.kind == "paste":
        count = int(rng.integers(1, MAX_PASTED_COMPONENTS + 1))
        return paste_components(source, pieces[recipe.class_id], recipe.class_id, count, rng)[0]
    return dihedral(source, recipe.kind)


def plan_augmentations(masks: Sequence[np.ndarray], counts: np.ndarray, hosts: Sequence[int],
                       short_classes: Sequence[int], participating: Sequence[int], per_class: int,
                       seed: int) -> tuple[list[Augmentation], dict[int, list[np.ndarray]]]:
    """Recipes for new masks that carry the short classes, and the pieces the "paste" recipes draw from.

    `counts` (masks x all classes) are the source masks' counts. For each short class: half the recipes are
    flips, turns and warps of the masks holding that class (variety where a class appears in few masks), the
    rest paste its components onto hosts; hosts holding no other participating class are used when there are
    any, so that pasting raises the short class alone."""
    rng = np.random.default_rng([seed, 1])
    square = all(m.shape[0] == m.shape[1] for m in masks)
    kinds = DIHEDRAL if square else DIHEDRAL[:3]
    recipes: list[Augmentation] = []
    pieces: dict[int, list[np.ndarray]] = {}
    for class_id in short_classes:
        holders = np.flatnonzero(counts[:, class_id] > 0)
        pieces[class_id] = [p for i in holders for p in components(masks[i], class_id)]
        if len(holders) == 0 or not pieces[class_id]:
            continue
        geometric = [(kind, int(i)) for i in holders for kind in kinds + ("warp",) * WARPS_PER_SOURCE]
        order = rng.permutation(len(geometric))[: per_class // 2]
        recipes += [Augmentation(geometric[j][0], geometric[j][1], class_id, int(rng.integers(2**62)))
                    for j in order]
        others = [c for c in participating if c != class_id]
        clean = [h for h in hosts if not counts[h, others].any()]
        pool = clean or list(hosts)
        recipes += [Augmentation("paste", int(pool[rng.integers(len(pool))]), class_id, int(rng.integers(2**62)))
                    for _ in range(per_class - len(order))]
    return recipes, pieces


# ---------------------------------------------------------------------------------------------------------------
# Balancing a list of masks


@dataclass(frozen=True)
class Choice:
    """One image to synthesise: a source mask as it is (augmentation None) or made new from it by a recipe."""

    source: int  # index into the source masks (the candidates, then the extra sources)
    augmentation: Augmentation | None = None


@dataclass
class Balanced:
    """What `balance` decided, and the counts the report compares (per participating class)."""

    choices: list[Choice]
    masks: list[np.ndarray]  # per image, its mask (class ids)
    participating: list[int]
    real: np.ndarray  # the real set's counts
    start: np.ndarray  # the starting point: the real counts, or zeros when balancing the synthetic set alone
    unbalanced: np.ndarray  # the candidates in dataset order, cycled: what sampling takes without balance_args
    selected: np.ndarray  # the chosen masks
    no_op: bool = False
    warning: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    reuse_penalty: float = REUSE_PENALTIES[0]  # the one the kept selection was made with

    @property
    def achieved(self) -> float:
        """The relative difference over start + selected: what max_class_dif bounds."""
        return relative_difference(self.start + self.selected)

    @property
    def augmented(self) -> int:
        """How many distinct augmented masks are among the choices."""
        return len({c.augmentation for c in self.choices if c.augmentation is not None})


def _describe_shares(counts: np.ndarray, names: Sequence[str]) -> str:
    return ", ".join(f"{name} {100 * s:.1f}%" for name, s in zip(names, shares(counts)))


def _short_classes(total: np.ndarray, participating: Sequence[int], tolerance: float) -> list[int]:
    """The participating class ids whose count is too far below the largest one."""
    return [c for k, c in enumerate(participating) if total[k] * (1 + tolerance) < total.max()]


def _augmented_selection(candidates: Sequence[np.ndarray], extra_sources: Sequence[np.ndarray],
                         all_counts: np.ndarray, useful: np.ndarray, short: list[int], participating: list[int],
                         start: np.ndarray, num_samples: int, num_classes: int, args: BalanceArgs,
                         seed: int, weights: np.ndarray | None = None
                         ) -> tuple[list[Choice], np.ndarray, float, dict[int, list[np.ndarray]], int]:
    """The selection made again over the useful candidates plus augmented masks made for the short classes.

    Returns the choices, their counts, the reuse penalty, the pieces the paste recipes need, and how many
    augmented masks were made."""
    sources = list(candidates) + list(extra_sources)
    source_counts = np.concatenate([all_counts, count_all(extra_sources, num_classes, args.based_on_pixel_count)])
    per_class = int(np.clip(num_samples, MIN_AUGMENTED_PER_CLASS, MAX_AUGMENTED_PER_CLASS))
    recipes, pieces = plan_augmentations(sources, source_counts, range(len(candidates)), short, participating,
                                         per_class, seed)
    kept, rows = [], []
    for recipe in recipes:  # count each new mask and let it go: only the chosen ones are made again
        made = make_augmented(recipe, sources, pieces)
        if not np.array_equal(made, sources[recipe.source]):
            kept.append(recipe)
            rows.append(count_classes(made, num_classes, args.based_on_pixel_count)[participating])
    recipes = kept
    made_counts = np.array(rows, np.float64).reshape(len(rows), len(participating))
    pool = np.concatenate([all_counts[useful][:, participating], made_counts]).astype(np.float64)
    uses = np.r_[np.zeros(len(useful)), np.full(len(recipes), float(AUGMENTED_START_USES))]
    pool_weights = None
    if weights is not None:  # an augmented mask is as hard as the candidate it was made from (else average)
        pool_weights = np.r_[weights[useful], [weights[r.source] if r.source < len(candidates) else 1.0
                                               for r in recipes]]
    picked, penalty = most_balanced_selection(pool, start, num_samples, seed, args.max_class_dif, uses,
                                              pool_weights)
    choices = [Choice(int(useful[i])) if i < len(useful) else
               Choice(recipes[i - len(useful)].source, recipes[i - len(useful)]) for i in picked]
    return choices, pool[picked].sum(0), penalty, pieces, len(recipes)


def balance(candidates: Sequence[np.ndarray], real_counts: np.ndarray, num_samples: int, num_classes: int,
            args: BalanceArgs, seed: int, class_names: Sequence[str] | None = None,
            extra_sources: Sequence[np.ndarray] = (), weights: np.ndarray | None = None) -> Balanced:
    """Choose num_samples masks among `candidates` (repetition allowed) for the balance `args` asks for.

    `real_counts` are the real set's counts per class id (all classes), the starting point unless
    based_on_generated_data_only. Candidates without any participating class are left out (they cannot help
    the balance). `extra_sources` are more masks (the real ones that are not candidates) that augmentation may
    take rare-class components from when the candidates lack them; they are never chosen as they are.
    `weights` (one per candidate, mean about 1; hardness_args) favour some candidates among those that help the
    balance alike (see `_best`). Deterministic for a seed; the choices come in a seeded shuffled order."""
    if not candidates:
        raise ValueError("balance needs at least one candidate mask")
    names = list(class_names) if class_names else [f"class {c}" for c in range(num_classes)]
    participating = args.participating(num_classes)
    part_names = [names[c] for c in participating]
    real = np.asarray(real_counts, np.float64)[participating]
    start = np.zeros_like(real) if args.based_on_generated_data_only else real
    all_counts = count_all(candidates, num_classes, args.based_on_pixel_count)
    counts = all_counts[:, participating].astype(np.float64)
    default = [Choice(i % len(candidates)) for i in range(num_samples)]
    unbalanced = counts[[c.source for c in default]].sum(0)

    def outcome(choices: list[Choice], selected: np.ndarray, pieces: dict[int, list[np.ndarray]] | None = None,
                **extra: Any) -> Balanced:
        sources = list(candidates) + list(extra_sources)
        made: dict[Augmentation, np.ndarray] = {}
        masks = []
        for choice in choices:
            if choice.augmentation is None:
                masks.append(sources[choice.source])
            else:
                if choice.augmentation not in made:
                    made[choice.augmentation] = make_augmented(choice.augmentation, sources, pieces or {})
                masks.append(made[choice.augmentation])
        return Balanced(choices, masks, participating, real, start, unbalanced, selected, **extra)

    if len(participating) <= 1:
        note = (f"balance_args: only {', '.join(part_names) or 'no class'} takes part (ejection_classes "
                f"{list(args.ejection_classes)}); with one class balancing is a no-op, masks are taken in dataset "
                f"order")
        return outcome(default, unbalanced, no_op=True, notes=[note])
    useful = np.flatnonzero(counts.sum(1) > 0)
    if len(useful) == 0:
        warning = (f"balance_args: none of the {len(candidates)} candidate masks holds a participating class "
                   f"({', '.join(part_names)}); masks are taken in dataset order")
        return outcome(default, unbalanced, warning=warning)

    weights = None if weights is None else np.asarray(weights, np.float64)
    picked, penalty = most_balanced_selection(counts[useful], start, num_samples, seed, args.max_class_dif,
                                              weights=None if weights is None else weights[useful])
    choices, selected = [Choice(int(useful[i])) for i in picked], counts[useful][picked].sum(0)
    pieces: dict[int, list[np.ndarray]] = {}
    notes: list[str] = []
    achieved = relative_difference(start + selected)
    if achieved > args.max_class_dif and args.use_mask_augmentation:
        short = _short_classes(start + selected, participating, args.max_class_dif)
        more, more_selected, more_penalty, pieces, made = _augmented_selection(
            candidates, extra_sources, all_counts, useful, short, participating, start, num_samples, num_classes,
            args, seed, weights)
        notes.append(f"balance_args: made {made} augmented candidate masks for {', '.join(names[c] for c in short)}")
        if relative_difference(start + more_selected) < achieved:
            choices, selected, penalty = more, more_selected, more_penalty
            achieved = relative_difference(start + selected)
        else:
            notes.append("balance_args: the augmented masks did not improve the balance; none is used")
    order = np.random.default_rng([seed, 2]).permutation(num_samples)
    choices = [choices[i] for i in order]
    warning = None
    if achieved > args.max_class_dif:
        missing = [part_names[k] for k in range(len(participating)) if counts[:, k].sum() == 0]
        reason = (f"{', '.join(missing)} in no candidate mask" if missing
                  else "the candidate masks cannot make up the difference with this many samples")
        hint = "" if args.use_mask_augmentation else "; use_mask_augmentation may help"
        over = "synthetic" if args.based_on_generated_data_only else "real+synthetic"
        shown = f"{achieved:.3f}" if np.isfinite(achieved) else "infinite"
        distinct = len(set(choices))
        warning = (f"balance_args: max_class_dif {args.max_class_dif:g} not reached with {num_samples} masks "
                   f"({reason}{hint}); the best selection found ({distinct} distinct masks) has relative difference "
                   f"{shown}, {over} shares {_describe_shares(start + selected, part_names)}")
    return outcome(choices, selected, pieces, warning=warning, notes=notes, reuse_penalty=penalty)


# ---------------------------------------------------------------------------------------------------------------
# Choosing the masks of a sampling run, and the report


@dataclass(frozen=True)
class ChosenMask:
    """One image a sampling run synthesises: the stem of its files and where its mask comes from."""

    stem: str  # the source pair's stem; "augNNNN-<kind>_<source stem>" for an augmented mask
    pair: Pair | None  # the real pair (its resized image goes to images/); None for an augmented mask
    mask: np.ndarray | None = None  # the augmented mask (class ids at image_size); None: the pair's own mask


def choose_masks(config: SampleConfig, candidates: list[Pair], real_pairs: list[Pair],
                 log: Callable[[str], None] = print,
                 weights: np.ndarray | None = None) -> tuple[list[ChosenMask], dict[str, Any]]:
    """The balanced masks of a sampling run and the report of their class shares (also printed to `log`).

    Candidates are the `mask_split` pairs; the real set is `real_pairs` (the dataset's train/ folder). Both are
    counted at the sampling image_size. `weights` (per candidate, from hardness_args) favour hard masks."""
    args = config.balance_args or BalanceArgs()
    with within("balance_args"):  # num_classes may be known only now (from the checkpoint)
        args.validate(config.num_classes)
    started = time.perf_counter()
    candidate_set = set(candidates)
    extra = [p for p in dict.fromkeys(real_pairs) if p not in candidate_set]
    loaded = load_masks(list(candidates) + extra, config.image_size, config.dataset_mode, config.resize_mode)
    mask_of = dict(zip(list(candidates) + extra, loaded))
    real_counts = count_all([mask_of[p] for p in real_pairs], config.num_classes,
                            args.based_on_pixel_count).sum(0)
    loading = time.perf_counter() - started
    names = read_class_names(config.data_dir, config.num_classes)
    result = balance([mask_of[p] for p in candidates], real_counts, config.num_samples, config.num_classes, args,
                     config.seed, names, [mask_of[p] for p in extra], weights)
    selecting = time.perf_counter() - started - loading

    sources = list(candidates) + extra
    numbers: dict[Augmentation, int] = {}
    chosen, listed = [], []
    for choice, mask in zip(result.choices, result.masks):
        pair = sources[choice.source]
        recipe = choice.augmentation
        if recipe is None:
            chosen.append(ChosenMask(pair.stem, pair))
            listed.append({"stem": pair.stem, "source": pair.stem, "augmentation": None})
            continue
        number = numbers.setdefault(recipe, len(numbers))
        stem = f"aug{number:04d}-{recipe.kind}_{pair.stem}"
        chosen.append(ChosenMask(stem, None, mask))
        listed.append({"stem": stem, "source": pair.stem, "augmentation": recipe.kind,
                       "class": names[recipe.class_id]})
    report = make_report(result, args, names, config.num_samples)
    report.update({"image_size": config.image_size, "mask_split": config.mask_split, "candidates": len(candidates),
                   "real_masks": len(real_pairs), "seconds_loading": round(loading, 3),
                   "seconds_selecting": round(selecting, 3), "masks": listed})
    for line in result.notes:
        log(line)
    for line in format_table(report):
        log(line)
    if result.warning:
        log(f"warning: {result.warning}")
    return chosen, report


def _finite(value: float) -> float | None:
    """JSON has no infinity: an infinite relative difference is written as null."""
    return round(float(value), 6) if np.isfinite(value) else None


def make_report(result: Balanced, args: BalanceArgs, names: Sequence[str], num_samples: int) -> dict[str, Any]:
    """The class shares of the real set, the synthetic sets without and with balancing, and real + each."""
    sets = {"real": result.real, "unbalanced": result.unbalanced, "selected": result.selected,
            "real+unbalanced": result.real + result.unbalanced, "real+selected": result.real + result.selected}
    return {
        "counted": "pixels" if args.based_on_pixel_count else "objects (8-connected components per class)",
        "balance_args": args.to_dict(),
        "relative_difference": "(max - min) / min of the participating classes' counts (null = infinite)",
        "balanced_over": "selected" if args.based_on_generated_data_only else "real+selected",
        "participating_classes": {str(c): names[c] for c in result.participating},
        "counts": {key: [int(round(v)) for v in value] for key, value in sets.items()},
        "shares": {key: [round(float(v), 6) for v in shares(value)] for key, value in sets.items()},
        "relative_differences": {key: _finite(relative_difference(value)) for key, value in sets.items()},
        "achieved": _finite(result.achieved),
        "within_tolerance": bool(result.achieved <= args.max_class_dif),
        "no_op": result.no_op,
        "warning": result.warning,
        "num_samples": num_samples,
        "distinct_masks": len({(c.source, c.augmentation) for c in result.choices}),
        "augmented_masks": result.augmented,
        "reuse_penalty": result.reuse_penalty,
    }


def format_table(report: dict[str, Any]) -> list[str]:
    """The report's shares as a small text table for the log, one line per class, then the differences."""
    columns = list(SHARE_SETS)
    names = [f"{c} {n}" for c, n in report["participating_classes"].items()]
    width = max([len("relative difference")] + [len(n) for n in names])
    lines = [f"class shares by {report['counted']} (balanced over {report['balanced_over']}, max_class_dif "
             f"{report['balance_args']['max_class_dif']:g}):",
             " " * width + "".join(f"{c:>17}" for c in columns)]
    for k, name in enumerate(names):
        lines.append(f"{name:<{width}}" + "".join(f"{100 * report['shares'][c][k]:>16.1f}%" for c in columns))
    differences = ["inf" if report["relative_differences"][c] is None else f"{report['relative_differences'][c]:.3f}"
                   for c in columns]
    lines.append(f"{'relative difference':<{width}}" + "".join(f"{d:>17}" for d in differences))
    return lines


def write_report(run_dir: str | Path, report: dict[str, Any]) -> None:
    """balance.json and balance.png (grouped bars of the shares) in the run folder."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    run_dir = Path(run_dir)
    write_json(run_dir / "balance.json", report)
    names = list(report["participating_classes"].values())
    shown = ("real", "unbalanced", "selected", "real+selected")
    figure = Figure(figsize=(max(6.0, 1.3 * len(names) + 2), 4), dpi=100)
    axes = figure.subplots()
    width = 0.8 / len(shown)
    for j, key in enumerate(shown):
        positions = np.arange(len(names)) + (j - (len(shown) - 1) / 2) * width
        label = key if report["relative_differences"][key] is None else \
            f"{key} (rel. diff. {report['relative_differences'][key]:.2f})"
        axes.bar(positions, [100 * s for s in report["shares"][key]], width, label=label)
    axes.set_xticks(np.arange(len(names)), names)
    axes.set_ylabel(f"share of {report['counted'].split(' ')[0]} (%)")
    achieved = "inf" if report["achieved"] is None else f"{report['achieved']:.3f}"
    axes.set_title(f"class shares; {report['balanced_over']}: relative difference {achieved} "
                   f"(max_class_dif {report['balance_args']['max_class_dif']:g})", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run_dir / "balance.png")

"""Copy-paste: `mode: "paste"` of a sample config, the training-free baseline for growing a dataset.

No model and no diffusion. For each chosen mask (chosen as in the other modes: `mask_split`, `num_samples`,
`balance_args`, `hardness_args`), the mask's real image and mask are loaded at image_size exactly as the dataset
loads them, and every defect pixel (class id != 0) is copied byte for byte onto a defect-free background. The
label is all background except the pasted pixels, which keep their class ids.

Backgrounds, pairing and placement are inpainting's (`inpaint.place_defects`): the dataset's train/ images whose
mask is all 0, or the images of `background_dir`; `pairing` random or round-robin; `mask_flip`; `mask_placement`
keep or random, a random shift keeping the whole bounding box of the defects inside the image, so every
component is pasted whole. Image i's background, flips and shift come from generators seeded by (seed, i), so
the images do not depend on batch_size (which pasting does not use). Masks without defect pixels at image_size,
and augmented masks (they have no real image to copy from), are skipped and counted.

With no checkpoint, the train/val split behind `mask_split: "val"` is recreated from the config's own seed and
val_fraction, num_classes comes from the config, else from classes.json (binary: 2), and `image_channels` "auto"
is resolved as training resolves it: 1 (grey images, grey pngs) when every train/ image is grayscale, else 3.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ..config import SampleConfig, config_to_dict
from ..data import Pair, load_image, load_mask, read_class_names, resize_pair
from ..distributed import current_world, made_by_main
from ..errors import ConfigError
from ..model_setup import resolve_image_channels
from ..run_folder import SampleWriter, new_run_dir, write_grid, write_json, write_legend
from .hardness import MeasureHardness, write_selection_reports
from .inpaint import (background_summary, defect_candidates, load_background, paste_defects, place_defects,
                      placement_listing, with_real_image)
from .mask_selection import TrainedWith, mask_splits, select_masks

CACHED_IMAGES = 128
"""Resized source images and backgrounds kept in memory while pasting (masks are cycled, backgrounds reused)."""


def load_source(pair: Pair, image_size: int, dataset_mode: str, resize_mode: str,
                channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A pair's image (uint8 HxWx3, or HxW grey with `channels` 1) and mask (int64 class ids) at image_size,
    loaded and resized as the dataset does."""
    image, mask = resize_pair(load_image(pair.image, channels), load_mask(pair.mask, dataset_mode), image_size,
                              resize_mode)
    return image, mask.astype(np.int64)


def resolve_paste_config(config: SampleConfig, log: Callable[[str], None] = print) -> tuple[SampleConfig, TrainedWith]:
    """The config with num_classes filled in (the config's, else classes.json's count, binary: 2), and the
    seed and val_fraction that recreate the train/val split: the config's own, as there is no checkpoint.
    (image_channels "auto" needs the dataset's train/ images: `run_paste` resolves it.)"""
    if config.model_path:
        log(f"note: key 'model_path' ({config.model_path}) is ignored with mode 'paste': pasting uses no model")
    num_classes = config.num_classes
    if num_classes is None:
        if config.dataset_mode == "binary":
            num_classes = 2
        else:
            try:
                num_classes = len(read_class_names(config.data_dir))
            except ValueError:
                raise ConfigError(f"key 'num_classes' is required with mode 'paste' (there is no checkpoint to read "
                                  f"it from) unless {config.data_dir} has classes.json") from None
    config = dataclasses.replace(config, num_classes=num_classes)
    return config, TrainedWith(seed=config.seed, val_fraction=config.val_fraction)


def run_paste(config: SampleConfig, log: Callable[[str], None] = print,
              measure_hardness: MeasureHardness | None = None) -> dict[str, Any]:
    """Paste the defects of the chosen masks onto backgrounds, into a fresh sample run folder under
    root_log_dir with the layout of the other modes (plus paste.json: each image's mask, background, flips and
    shift). Everything that can fail on the user's input fails before the folder is made. Under a launcher every
    rank checks the input and rank 0 alone pastes and writes."""
    world = current_world()
    log = log if world.is_main else (lambda *_: None)
    config, trained = resolve_paste_config(config, log)
    class_names = read_class_names(config.data_dir, config.num_classes)  # a bad classes.json fails before any work
    splits, real_pairs = mask_splits(config, trained)
    config = resolve_image_channels(config, real_pairs, log)  # "auto": 1 when every train/ image is grey
    splits, without_defects = defect_candidates(config, splits)
    chosen, selection_report = select_masks(config, splits, real_pairs, log, measure_hardness)
    with_image, without_image = with_real_image(chosen, "paste", "copy defects from", log)
    placed = place_defects(config, with_image, real_pairs, without_defects, log)
    sources, backgrounds, placements = placed.sources, placed.backgrounds, placed.placements
    log(f"paste: {len(sources)} masks from split '{config.mask_split}' ({len({s.stem for s in sources})} distinct) "
        f"on {len({p.background for p in placements})} of {len(backgrounds)} backgrounds ({config.pairing} "
        f"pairing, flips {'on' if config.mask_flip else 'off'}, placement {config.mask_placement})")

    run_dir = made_by_main(lambda: new_run_dir(config.root_log_dir, "sample"))
    if not world.is_main:
        return {"run_dir": str(run_dir)}
    log(f"run folder: {run_dir}")
    config = dataclasses.replace(config, num_samples=len(sources))  # the images made: skipped masks make none
    write_json(run_dir / "config.json", config_to_dict(config))
    write_selection_reports(run_dir, selection_report)
    write_json(run_dir / "paste.json", placement_listing(sources, backgrounds, placements))

    @functools.lru_cache(maxsize=CACHED_IMAGES)
    def source_of(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        return load_source(pair, config.image_size, config.dataset_mode, config.resize_mode, config.image_channels)

    @functools.lru_cache(maxsize=CACHED_IMAGES)
    def background_of(index: int) -> np.ndarray:
        return load_background(backgrounds[index], config.image_size, config.resize_mode, config.image_channels)

    writer = SampleWriter(run_dir, config.num_classes, config.ignore_index)
    grid_rows, pasted_pixels, started = [], 0, time.perf_counter()
    for i in tqdm(range(len(sources)), desc="paste", unit="image", dynamic_ncols=True):
        image, mask = source_of(sources[i].pair)
        background = background_of(placements[i].background)
        pasted, label = paste_defects(background, image, mask, placements[i])
        writer.write(f"{i:05d}_{sources[i].stem}", pasted, label, background)
        pasted_pixels += int(np.count_nonzero(label))
        if i < 8:
            grid_rows.append((label, background, pasted))
    seconds = time.perf_counter() - started
    write_grid(run_dir / "grid.png", grid_rows, config.num_classes, ignore_index=config.ignore_index)
    write_legend(run_dir / "legend.png", class_names)
    summary = {"mode": "paste", "num_samples": len(sources), "mask_split": config.mask_split,
               "mask_flip": config.mask_flip, "mask_placement": config.mask_placement,
               **background_summary(config, backgrounds, placements), **placed.skipped,
               "skipped_masks_without_source_image": without_image,
               "mean_pasted_pixels": round(pasted_pixels / len(sources), 1),
               "seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(sources), 5)}
    write_json(run_dir / "summary.json", summary)
    log(f"wrote {len(sources)} pasted images to {run_dir} ({summary['seconds_per_image'] * 1000:.1f} ms/image)")
    return {**summary, "run_dir": str(run_dir)}

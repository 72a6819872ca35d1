"""Variations and inpainting on real images: the `mode` key of a sample config.

- `noise`: today's sampling; image i starts from its own Gaussian noise.
- `variation` (SDEdit, Meng et al. 2022): the real image of the mask is noised to the step that `strength` names
  and denoised from there with the mask; strength 1 starts from the noise alone, i.e. is sampling from noise.
- `inpaint` (RePaint, Lugmayr et al. 2022): a defect mask is placed on a background (a defect-free image) and
  only the painted region, the mask's defect pixels dilated by `inpaint_margin` px, is generated: after every
  update the rest of x (the known region) is replaced by the background noised to the step reached, and every
  step is taken 1 + `resample_steps` times with a one-step jump back up in between, so that the painted region
  is denoised again seeing the pasted surroundings. The final image is composited in uint8 pixel space: outside
  the painted region it is the resized background byte for byte.
- `harmonize`: copy-paste, then SDEdit inside the painted region. The mask's real defect pixels are pasted onto
  the background as `paste` does; the run starts from that pasted image noised to `strength` and paints the
  painted region as `inpaint` does (the rest kept from the background). At a low strength the real defect keeps
  its shape and texture while its edges and its tone are redrawn to fit the new background, which pasting alone
  leaves as hard seams. The masks need their real image (an augmented or generated mask has none).
- `blend`: copy-paste, then RePaint on the seam only. The real defect is pasted as `paste` does and stays byte for
  byte; the painted region is the ring of `inpaint_margin` px around it (the defect's own pixels left out), and
  the known region is the pasted image. So the model draws only the transition between a real defect and its new
  background, the place where pasting leaves its hard edges. Its masks need their real image too.
- `paste` (paste.py): no model at all; the mask's real defect pixels are copied onto a background. It uses the
  backgrounds, pairing and placement of this module (`place_defects`).

Every random choice of image i (which background, flips, placement) comes from a generator seeded by (seed, i),
and every noise draw (start, pasted known region, jumps) from its `PerImageNoise` generator, so image i is the
same whatever the batch size or the process that computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from ..balance import ChosenMask, load_masks
from ..config import PAINTING_MODES, PLACING_MODES, SampleConfig
from ..data import IMAGE_EXTENSIONS, Pair, load_image, load_mask, resize_pair
from ..diffusion import GaussianDiffusion
from ..errors import ConfigError, DatasetError
from ..samplers import NoiseSource, StepHook

MODES = ("noise", "variation", "inpaint", "harmonize", "blend", "paste")
PAIRINGS = ("random", "round-robin")
MAX_ENLARGEMENT = 4.0
"""A background_dir image enlarged more than this to reach image_size is refused: its known region would be a
blur next to the detail the model paints."""
_PAIRING_STREAM, _PLACEMENT_STREAM = 9, 10
"""Third seed words of the per-image generators of the background choice and of the placement: streams apart
from each other and from the noise (seeded by (seed, i))."""


# ---------------------------------------------------------------------------------------------------------------
# The painted region and the known region


def paint_region(mask: np.ndarray, margin: int) -> np.ndarray:
    """The pixels inpainting generates (bool HxW): every pixel within `margin` px (Euclidean) of a defect pixel
    (class id != 0). The margin lets the model blend the defect into its surroundings instead of stopping at
    the mask's edge; everything else is the known region, kept from the background."""
    defect = np.asarray(mask) != 0
    if margin <= 0 or not defect.any():
        return defect
    distance = cv2.distanceTransform((~defect).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance <= margin


def known_region_hook(diffusion: GaussianDiffusion, background: torch.Tensor, keep: torch.Tensor,
                      noise: NoiseSource) -> StepHook:
    """RePaint's paste as a sampler hook: where `keep` (bool N×1×H×W) is true, x is replaced by `background`
    (N×C×H×W in [-1, 1]) noised to the step x has reached, with fresh noise from the per-image source; at the
    end (step -1) by the background itself."""

    def paste(x: torch.Tensor, step: int) -> torch.Tensor:
        if step < 0:
            known = background
        else:
            t = torch.full((len(background),), step, dtype=torch.long, device=background.device)
            known = diffusion.q_sample(background, t, noise())
        return torch.where(keep, known.to(x.dtype), x)

    return paste


def composite(sample: np.ndarray, background: np.ndarray, painted: np.ndarray) -> np.ndarray:
    """The final inpainted image in uint8 pixel space: the sample inside the painted region, the background's
    own bytes elsewhere (so the known region is exact, whatever the float rounding of the sampler)."""
    return np.where(painted[:, :, None] if sample.ndim == 3 else painted, sample, background)


# ---------------------------------------------------------------------------------------------------------------
# SDEdit start


def start_step(diffusion: GaussianDiffusion, strength: float) -> int:
    """The step of `diffusion` an SDEdit run of `strength` starts at: the one whose model timestep is nearest to
    strength x the model's last timestep, so a strength means the same noise level with every sampler and step
    grid. Strength 1 is the top step."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    target = strength * (diffusion.original_num_steps - 1)
    return int(torch.argmin((diffusion.timestep_map.double() - target).abs()))


def noised_start(diffusion: GaussianDiffusion, image: torch.Tensor, step: int, eps: torch.Tensor) -> torch.Tensor:
    """x at `step` for a run that starts from `image`: q(x_step | image) with the noise `eps`. At the top step the
    noise alone, as sampling from noise starts (sqrt(alpha_bar) is below 0.01 there for every schedule we make),
    so that strength 1 is exactly sampling from noise for the same seed."""
    if step == diffusion.num_timesteps - 1:
        return eps
    t = torch.full((len(image),), step, dtype=torch.long, device=image.device)
    return diffusion.q_sample(image, t, eps)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float 3xHxW in [-1, 1] (HxW grey -> 1xHxW), as the dataset makes it."""
    image = image[:, :, None] if image.ndim == 2 else image
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds, pairing, placement


@dataclass(frozen=True)
class Background:
    """An image defects are painted onto: a file of background_dir, or a train image whose mask is all 0."""

    name: str
    path: Path
    from_dataset: bool


def defect_free_pairs(pairs: Sequence[Pair], dataset_mode: str) -> list[Pair]:
    """The pairs whose mask (at its own size) has no defect pixel."""
    return [pair for pair in pairs if not load_mask(pair.mask, dataset_mode).any()]


def list_backgrounds(background_dir: str, real_pairs: Sequence[Pair], dataset_mode: str,
                     mode: str = "inpaint") -> list[Background]:
    """The images of `background_dir` (sorted by name), or without it the dataset's train/ images whose mask is
    all background. `mode` is the sample mode that needs them, named in the error when there are none."""
    if background_dir:
        folder = Path(background_dir)
        if not folder.is_dir():
            raise ConfigError(f"key 'background_dir': folder {folder} not found")
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"key 'background_dir': {folder} holds no images ({'/'.join(IMAGE_EXTENSIONS)})")
        return [Background(p.name, p, False) for p in files]
    free = defect_free_pairs(real_pairs, dataset_mode)
    if not free:
        raise ConfigError(f"key 'mode' is {mode!r}, which needs defect-free images, but key 'background_dir' is not "
                          f"set and no train/ image of the dataset has an all-background mask; set background_dir "
                          f"to a folder of defect-free images")
    return [Background(pair.image.name, pair.image, True) for pair in free]


def background_problem(path: Path, image_size: int) -> str | None:
    """Why a background_dir image cannot be used, or None: unreadable, transparent pixels (they have no colour
    to keep), or so small that reaching image_size would enlarge it more than MAX_ENLARGEMENT times."""
    try:
        with Image.open(path) as image:
            image.load()
            transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
            if transparent and np.asarray(image.convert("RGBA"))[:, :, 3].min() < 255:
                return f"has transparent pixels (mode {image.mode}); save it without transparency"
            width, height = image.size
    except Exception as error:  # any decoder failure on a user file is a data problem
        reason = str(error).splitlines()[0][:80] if str(error) else type(error).__name__
        return f"cannot be read ({reason})"
    if image_size / min(width, height) > MAX_ENLARGEMENT:
        return (f"is {width}x{height}, too small for image_size {image_size} (enlarged more than "
                f"{MAX_ENLARGEMENT:g}x); use images of at least {int(np.ceil(image_size / MAX_ENLARGEMENT))} px a side")
    return None


def check_backgrounds(backgrounds: Sequence[Background], image_size: int) -> None:
    """One DatasetError naming every background_dir image that cannot be used (dataset images were checked with
    the dataset and are what the model was trained on)."""
    problems = [f"{b.path.name} {problem}" for b in backgrounds if not b.from_dataset
                for problem in [background_problem(b.path, image_size)] if problem]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(f"background_dir {backgrounds[0].path.parent}: {len(problems)} unusable images: {shown}")


def load_background(background: Background, image_size: int, resize_mode: str, channels: int = 3) -> np.ndarray:
    """The background as uint8 image_size x image_size x 3 (`channels` 1: image_size x image_size grey), resized
    exactly as the dataset's images are."""
    image = load_image(background.path, channels)
    resized, _ = resize_pair(image, np.zeros(image.shape[:2], np.uint8), image_size, resize_mode)
    return resized




def pair_backgrounds(count: int, num_backgrounds: int, pairing: str, seed: int) -> list[int]:
    """The background of each of `count` images: 'random' draws one per image from the image's own generator
    (with replacement); 'round-robin' goes through a seeded shuffle of the backgrounds in turn, so each is used
    equally often (within one)."""
    if pairing == "random":
        return [int(np.random.default_rng([seed, i, _PAIRING_STREAM]).integers(num_backgrounds))
                for i in range(count)]
    if pairing == "round-robin":
        order = np.random.default_rng([seed, _PAIRING_STREAM]).permutation(num_backgrounds)
        return [int(order[i % num_backgrounds]) for i in range(count)]
    raise ValueError(f"unknown pairing {pairing!r}; expected one of {', '.join(PAIRINGS)}")


@dataclass(frozen=True)
class Placement:
    """Where image i's mask goes on its background: flips first, then a shift (rows, columns)."""

    background: int
    flip_horizontal: bool = False
    flip_vertical: bool = False
    shift: tuple[int, int] = (0, 0)


def _flipped(mask: np.ndarray, horizontal: bool, vertical: bool) -> np.ndarray:
    if horizontal:
        mask = mask[:, ::-1]
    if vertical:
        mask = mask[::-1]
    return mask


def choose_placement(mask: np.ndarray, background: int, rng: np.random.Generator, flip: bool,
                     move: bool) -> Placement:
    """Random flips (each axis with probability 1/2) and a random shift that keeps every defect pixel inside the
    image (uniform over the positions of the defects' bounding box)."""
    horizontal, vertical = (bool(rng.random() < 0.5), bool(rng.random() < 0.5)) if flip else (False, False)
    shift = (0, 0)
    if move:
        rows, columns = np.nonzero(_flipped(mask, horizontal, vertical))
        if len(rows):
            height, width = mask.shape
            shift = (int(rng.integers(-rows.min(), height - rows.max())),
                     int(rng.integers(-columns.min(), width - columns.max())))
    return Placement(background, horizontal, vertical, shift)


def place_mask(mask: np.ndarray, placement: Placement) -> np.ndarray:
    """The mask (or an HxWxC image, the same way) flipped and shifted as `placement` says. The shift keeps the
    defects inside the image, so the pixels rolled around the edge are background (0) and rolling equals moving."""
    moved = _flipped(mask, placement.flip_horizontal, placement.flip_vertical)
    return np.ascontiguousarray(np.roll(moved, placement.shift, axis=(0, 1)))


def with_real_image(sources: Sequence[ChosenMask], mode: str, purpose: str, log: Callable[[str], None]
                    ) -> tuple[list[ChosenMask], int]:
    """The chosen masks that have their real image (modes variation, harmonize and paste use it; a mask made by
    balance_args' augmentation has none), and how many were skipped (logged as "they have no real image to
    `purpose`"). One error line when none is left."""
    kept = [chosen for chosen in sources if chosen.pair is not None]
    if len(kept) < len(sources):
        log(f"{mode}: skipped {len(sources) - len(kept)} augmented masks: they have no real image to {purpose}")
    if not kept:
        raise ConfigError(f"mode '{mode}' needs masks with their real image, but every chosen mask is augmented; "
                          "turn off use_mask_augmentation in balance_args")
    return kept, len(sources) - len(kept)


def paste_defects(background: np.ndarray, image: np.ndarray, mask: np.ndarray,
                  placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """The background with the defect pixels of (image, mask) pasted, and its label.

    Image and mask are flipped and shifted together as `placement` says (its shift keeps the defects inside the
    image); every pixel whose placed class id is not 0 takes the source image's bytes, every other pixel keeps
    the background's. Returns the uint8 image (HxWx3, or HxW for grey inputs) and the int64 HxW label (0 except
    the pasted pixels)."""
    if image.shape[:2] != mask.shape or background.shape != image.shape:
        raise ValueError(f"paste_defects expects background and image of one shape (HxWx3 or HxW) and an HxW mask "
                         f"of their size, got {background.shape}, {image.shape} and {mask.shape}")
    label = place_mask(np.asarray(mask, np.int64), placement)
    moved = place_mask(image, placement)
    pasted = label != 0
    return np.where(pasted if image.ndim == 2 else pasted[:, :, None], moved, background), label


# ---------------------------------------------------------------------------------------------------------------
# The plan of a sampling run


def defect_candidates(config: SampleConfig, splits: dict[str, list[Pair]]) -> tuple[dict[str, list[Pair]], int]:
    """For the modes that place defects (inpaint, harmonize, paste): the `mask_split` pairs reduced to those with
    defect pixels at image_size (a mask without them has nothing to paint or paste), and how many were left out.
    Other modes: the splits as they are."""
    if config.mode not in PLACING_MODES:
        return splits, 0
    pairs = splits[config.mask_split]
    masks = load_masks(pairs, config.image_size, config.dataset_mode, config.resize_mode)
    kept = [pair for pair, mask in zip(pairs, masks) if mask.any()]
    if pairs and not kept:
        raise ConfigError(f"key 'mask_split' is {config.mask_split!r} but none of its {len(pairs)} masks has defect "
                          f"pixels at image_size {config.image_size}; mode {config.mode!r} needs defect masks")
    return {**splits, config.mask_split: kept}, len(pairs) - len(kept)


class PlacedDefects(NamedTuple):
    """The masks of a run that puts defects onto backgrounds (inpaint, paste): the kept masks, the backgrounds
    and, per kept mask, its background, flips and shift; and the skip counts for summary.json."""

    sources: list[ChosenMask]
    backgrounds: list[Background]
    placements: list[Placement]
    skipped: dict[str, int]


def place_defects(config: SampleConfig, sources: Sequence[ChosenMask], real_pairs: Sequence[Pair],
                  excluded: int = 0, log: Callable[[str], None] = print) -> PlacedDefects:
    """Drop the chosen masks without defect pixels at image_size (counted with the `excluded` split masks that
    `defect_candidates` left out), list the backgrounds (see `list_backgrounds`), pair each kept mask with one
    (`pairing`) and choose its flips and shift (`mask_flip`, `mask_placement`) with image i's own generator.
    The backgrounds used are checked here, before anything is written."""
    mode = config.mode
    unique = list(dict.fromkeys(chosen.pair for chosen in sources if chosen.pair is not None))
    mask_of = dict(zip(unique, load_masks(unique, config.image_size, config.dataset_mode, config.resize_mode)))
    masks = [chosen.mask if chosen.mask is not None else mask_of[chosen.pair] for chosen in sources]
    kept = [(chosen, mask) for chosen, mask in zip(sources, masks) if np.any(mask)]
    skipped = {"skipped_masks_without_defects": excluded + len(sources) - len(kept)}
    if skipped["skipped_masks_without_defects"]:
        log(f"{mode}: skipped {skipped['skipped_masks_without_defects']} masks without defect pixels at "
            f"image_size {config.image_size}: {excluded} of split '{config.mask_split}' before the selection, "
            f"{len(sources) - len(kept)} chosen augmented masks")
    if not kept:
        raise ConfigError(f"mode {mode!r}: none of the chosen masks has defect pixels; nothing to "
                          f"{'paint' if mode == 'inpaint' else mode}")
    backgrounds = list_backgrounds(config.background_dir, real_pairs, config.dataset_mode, mode)
    chosen_backgrounds = pair_backgrounds(len(kept), len(backgrounds), config.pairing, config.seed)
    placements = []
    for i, ((_, mask), background) in enumerate(zip(kept, chosen_backgrounds)):
        rng = np.random.default_rng([config.seed, i, _PLACEMENT_STREAM])
        placements.append(choose_placement(np.asarray(mask), background, rng, config.mask_flip,
                                           config.mask_placement == "random"))
    check_backgrounds([backgrounds[i] for i in sorted(set(chosen_backgrounds))], config.image_size)
    return PlacedDefects([chosen for chosen, _ in kept], backgrounds, placements, skipped)


def placement_listing(sources: Sequence[ChosenMask], backgrounds: Sequence[Background],
                      placements: Sequence[Placement]) -> list[dict]:
    """inpaint.json / paste.json: per image, its mask, background, flips and shift."""
    return [{"index": i, "mask": chosen.stem, "background": backgrounds[p.background].name,
             "flip_horizontal": p.flip_horizontal, "flip_vertical": p.flip_vertical, "shift": list(p.shift)}
            for i, (chosen, p) in enumerate(zip(sources, placements))]


def background_summary(config: SampleConfig, backgrounds: Sequence[Background],
                       placements: Sequence[Placement]) -> dict:
    """summary.json's entries about the backgrounds of an inpaint or paste run."""
    return {"pairing": config.pairing, "backgrounds": len(backgrounds),
            "backgrounds_used": len({p.background for p in placements}),
            "background_dir": config.background_dir or "train/ images with all-0 masks"}


@dataclass
class Batch:
    """What one sampling batch starts from and how its results are finished."""

    x: torch.Tensor  # the sampler's starting x
    masks: torch.Tensor  # int64 N×H×W: the conditioning masks, written as the labels
    shown: list[np.ndarray | None]  # per image, what images/ holds: the real, source or background image
    hook: StepHook | None = None
    painted: list[np.ndarray] | None = None  # the painting modes: the painted region of each image
    known: list[np.ndarray] | None = None  # and the image its known region is kept from

    def finish(self, k: int, sample: np.ndarray) -> np.ndarray:
        """Image k's final uint8 image: painted images are composited onto their known image."""
        if self.painted is None:
            return sample
        return composite(sample, self.known[k], self.painted[k])


@dataclass
class ModePlan:
    """What a sampling run does in its `mode`: the images it makes (`sources`), the step it starts at, and for
    inpainting the background and placement of every image."""

    config: SampleConfig
    diffusion: GaussianDiffusion
    sources: list[ChosenMask]
    start_step: int | None  # None: the top step, exactly as sampling from noise always did
    backgrounds: list[Background] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def steps_run(self) -> int:
        return self.diffusion.num_timesteps if self.start_step is None else self.start_step + 1

    @property
    def resample_steps(self) -> int:
        return self.config.resample_steps if self.config.mode in PAINTING_MODES else 0

    def prepare(self, ids: Sequence[int], items: Sequence[tuple[torch.Tensor, np.ndarray | None]],
                noise: NoiseSource, device: torch.device | str) -> Batch:
        """The batch of images `ids` (indices into sources) from their (mask, real image or None) items; the
        first draw of each image's noise is its start, as in sampling from noise."""
        masks = torch.stack([mask for mask, _ in items])
        reals = [real for _, real in items]
        mode = self.config.mode
        if mode == "noise":
            return Batch(noise(), masks, reals)
        if mode == "variation":
            source = torch.stack([image_to_tensor(real) for real in reals]).to(device)
            return Batch(noised_start(self.diffusion, source, self.start_step, noise()), masks, reals)
        placed, shown, painted, starts, known = [], [], [], [], []
        for i, (mask, real) in zip(ids, items):
            placement = self.placements[i]
            placed.append(torch.from_numpy(place_mask(mask.numpy(), placement)))
            shown.append(load_background(self.backgrounds[placement.background], self.config.image_size,
                                         self.config.resize_mode, self.config.image_channels))
            painted.append(paint_region(placed[-1].numpy(), self.config.inpaint_margin))
            # harmonize and blend start from the real defect pasted onto the background; inpaint from the
            # background. Blend keeps the pasted defect (known) and paints only the ring around it.
            starts.append(paste_defects(shown[-1], real, mask.numpy(), placement)[0] if mode != "inpaint"
                          else shown[-1])
            if mode == "blend":
                painted[-1] = painted[-1] & (placed[-1].numpy() == 0)
            known.append(starts[-1] if mode == "blend" else shown[-1])
        kept = torch.stack([image_to_tensor(image) for image in known]).to(device)
        keep = torch.from_numpy(~np.stack(painted))[:, None].to(device)
        start = torch.stack([image_to_tensor(image) for image in starts]).to(device)
        x = noised_start(self.diffusion, start, self.start_step, noise())
        return Batch(x, torch.stack(placed), shown, known_region_hook(self.diffusion, kept, keep, noise),
                     painted, known)

    def summary(self) -> dict:
        """The mode's entries of summary.json."""
        mode = self.config.mode
        if mode == "noise":
            return {"mode": mode}
        entries = {"mode": mode, "strength": self.config.strength, "start_step": self.start_step,
                   "steps_run": self.steps_run, **self.skipped}
        if mode in PAINTING_MODES:
            entries.update({"inpaint_margin": self.config.inpaint_margin, "resample_steps": self.resample_steps,
                            **background_summary(self.config, self.backgrounds, self.placements)})
        return entries

    def listing(self) -> list[dict]:
        """inpaint.json: per image, its mask, background, flips and shift."""
        return placement_listing(self.sources, self.backgrounds, self.placements)


def plan_modes(config: SampleConfig, diffusion: GaussianDiffusion, sources: list[ChosenMask],
               real_pairs: Sequence[Pair], excluded: int = 0, log: Callable[[str], None] = print) -> ModePlan:
    """The plan of a run in config.mode from the chosen masks. `excluded` is the count of split masks without
    defect pixels that `defect_candidates` left out. Images are skipped (and counted) when the mode cannot use
    their mask: variation needs the mask's real image (an augmented mask has none); inpaint needs defect pixels.
    Backgrounds are listed, paired and (background_dir's) checked here, before anything is written."""
    if config.mode == "noise":
        return ModePlan(config, diffusion, list(sources), None)
    start = start_step(diffusion, config.strength)
    if config.mode == "variation":
        kept, without_image = with_real_image(sources, "variation", "vary", log)
        skipped = {"skipped_masks_without_source_image": without_image}
        log(f"variation: strength {config.strength:g} starts at step {start} of {diffusion.num_timesteps} "
            f"(model timestep {int(diffusion.timestep_map[start])})")
        return ModePlan(config, diffusion, kept, start, skipped=skipped)

    skipped = {}
    if config.mode in ("harmonize", "blend"):
        # they paste the mask's real defect: a mask without its real image makes none
        sources, without_image = with_real_image(sources, config.mode, "paste a defect from", log)
        skipped = {"skipped_masks_without_source_image": without_image}
    placed = place_defects(config, sources, real_pairs, excluded, log)
    placed = placed._replace(skipped={**placed.skipped, **skipped})
    log(f"{config.mode}: strength {config.strength:g} starts at step {start} of {diffusion.num_timesteps}; "
        f"{len(placed.sources)} masks on {len({p.background for p in placed.placements})} of "
        f"{len(placed.backgrounds)} backgrounds ({config.pairing} pairing), painted region = defects + "
        f"{config.inpaint_margin} px, {config.resample_steps} resampling jumps per step")
    return ModePlan(config, diffusion, placed.sources, start, placed.backgrounds, placed.placements, placed.skipped)

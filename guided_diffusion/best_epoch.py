"""How training chooses its best epoch (`checkpoints/best.pt`): the loss of the EMA weights on one fixed batch.

ISDM keeps the epoch of lowest mean training loss. That mean is an average over the epoch's random timesteps and
noises, and the loss of one sample swings by orders of magnitude with its timestep. On a small dataset (an epoch
of 12 batches) the epoch mean swings more between epochs than the model improves: in a 1,500-step run on 94
images the per-epoch loss went up and down between 0.004 and 0.03 after epoch 25, best.pt held epoch 37 (about
step 450), and about two thirds of the training never reached the images sampled.

`best_by: "fixed_batch"` (the default) compares epochs on the same work instead: a batch of FIXED_ROWS items of
the training set, each with its own timestep, noise, crop
window and kept-or-null label, all drawn once from the run's seed, and never from the training generator, so
turning it on or off trains the same weights. The timesteps are spread evenly over the schedule, so every part of
the process counts the same in every check. Its loss is the training loss (the same hybrid loss, min-SNR
weighting and pixel weights), computed without gradients on the EMA weights, which are what sampling uses and
what the finetune starts from.

A check costs a no-gradient forward of FIXED_ROWS rows, about a third of a training step's cost per row. It is
run at the end of an epoch once `check_interval` steps have passed since the last, which keeps it near
CHECK_SHARE of the training time; an epoch without a check cannot become the best. `best_by: "epoch_loss"` is
ISDM's rule: every epoch, by its mean training loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import distributed
from .data import one_hot
from .diffusion import GaussianDiffusion

FIXED_ROWS = 32
"""Rows of the fixed batch: 32 timesteps spread over the schedule, on up to 32 items."""

CHECK_SHARE = 0.05
"""The share of the training time the checks may take (a forward row costs about a third of a training row)."""

BEST_BY = ("fixed_batch", "epoch_loss")


def check_interval(global_batch: int, rows: int = FIXED_ROWS) -> int:
    """Steps between two checks of the fixed batch: its forward costs about rows / 3 training rows, kept under
    CHECK_SHARE of the `global_batch` rows the steps between two checks train on (27 steps at batch 8, 1 step
    at batch 214 or more)."""
    return max(1, math.ceil(rows / (3.0 * CHECK_SHARE * global_batch)))


@dataclass(frozen=True)
class FixedBatch:
    """The batch every check computes the loss of: images (N x C x S x S in [-1, 1], S the crop size where the
    run trains on crops), one-hot labels (zeroed where the item's label is dropped), timesteps and noises."""

    images: torch.Tensor
    labels: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    def rows(self, selection: slice) -> FixedBatch:
        return FixedBatch(self.images[selection], self.labels[selection], self.t[selection], self.noise[selection])


def make_fixed_batch(items: Callable[[int], dict[str, torch.Tensor]], num_items: int, num_timesteps: int,
                     num_classes: int, ignore_index: int | None, seed: int, crop_size: int = 0,
                     drop_rate: float = 0.0, offset_noise: float = 0.0, rows: int = FIXED_ROWS) -> FixedBatch:
    """The fixed batch of a run: `rows` rows over the `num_items` items `items(i)` gives ({"image", "mask"}),
    every item once before any twice, and the timesteps (i + 0.5) x T / rows in a seeded order. Every draw comes
    from a generator of its own, seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919)
    order = torch.randperm(num_items, generator=generator)
    chosen = [int(order[i % num_items]) for i in range(rows)]
    loaded = {index: items(index) for index in set(chosen)}
    images = torch.stack([loaded[i]["image"] for i in chosen])
    masks = torch.stack([loaded[i]["mask"] for i in chosen])
    if crop_size:
        room = images.shape[-1] - crop_size + 1
        top = torch.randint(0, room, (rows,), generator=generator)
        left = torch.randint(0, room, (rows,), generator=generator)
        images = torch.stack([im[:, y:y + crop_size, x:x + crop_size] for im, y, x in zip(images, top, left)])
        masks = torch.stack([m[y:y + crop_size, x:x + crop_size] for m, y, x in zip(masks, top, left)])
    spread = ((torch.arange(rows, dtype=torch.float64) + 0.5) * num_timesteps / rows).long()
    t = spread[torch.randperm(rows, generator=generator)]
    noise = torch.randn(images.shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(images.shape[:2] + (1, 1), generator=generator)
    keep = (torch.rand(rows, generator=generator) >= drop_rate).float()
    labels = one_hot(masks, num_classes, ignore_index) * keep[:, None, None, None]
    return FixedBatch(images, labels, t, noise)


@torch.no_grad()
def fixed_batch_loss(diffusion: GaussianDiffusion, network: Callable[..., torch.Tensor], batch: FixedBatch,
                     device: torch.device, autocast: bool, min_snr_gamma: float = 0.0,
                     pixel_weights: Callable[[torch.Tensor], torch.Tensor | None] = lambda _: None,
                     chunk: int = 0) -> float:
    """The mean training loss of `network` (e.g. the EMA weights) on the fixed batch. With several processes each
    rank computes its share of the rows and the sums are all-reduced (a collective: every rank calls it).
    `chunk` > 0 limits the rows of one forward (the run's microbatch)."""
    start, stop = distributed.shard_bounds(batch.images.shape[0], distributed.current_world())
    mine = batch.rows(slice(start, stop))
    total = torch.zeros((), dtype=torch.float64, device=device)
    size = chunk if chunk > 0 else max(1, mine.images.shape[0])
    for first in range(0, mine.images.shape[0], size):
        part = mine.rows(slice(first, first + size))
        images, labels = part.images.to(device), part.labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            terms = diffusion.training_losses(lambda x, ts: network(x, ts, labels), images, part.t.to(device),
                                              part.noise.to(device), min_snr_gamma, pixel_weights(images))
        total += terms["loss"].double().sum()
    return float(distributed.all_reduce_sum(total)) / batch.images.shape[0]

"""Classifier-free guidance as a wrapper around the model (a "denoiser"), not a branch inside the diffusion.

A denoiser is any callable `(x_t, model_timesteps) -> model output` for a fixed batch of masks. The guided
denoiser evaluates the conditional and the null-label (all-zero one-hot) model in ONE batched forward and
combines their eps as SDM does: eps = eps_null + s * (eps_cond - eps_null); the learned variance channels come
from the conditional output.

With a guidance interval (Kynkäänniemi et al., NeurIPS 2024, "Applying guidance in a limited interval improves
sample and distribution quality in diffusion models") guidance is applied only at the steps whose diffusion time
t/T lies in [low, high]; every other step runs the conditional model alone, one forward of the batch instead of
the cond + null pair. The denoiser decides from the timesteps it is given, so every sampler (and inpainting's and
variations' runs of them) gets the interval without knowing of it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .diffusion import GaussianDiffusion
from .unet import FixedMasks, MemoryBudget, SDMUNet

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def conditional_denoiser(model: torch.nn.Module, one_hot: torch.Tensor, guidance_scale: float = 1.0,
                         batched: bool = True,
                         guidance_interval: tuple[float, float] | list[float] | None = None,
                         time_range: float = 1000.0) -> Denoiser:
    """The model conditioned on `one_hot`, with classifier-free guidance when guidance_scale > 1.

    `batched` runs the conditional and null passes as one forward of twice the batch (faster on every device we
    measured); False runs two forwards of the batch (SDM/ISDM's way, half the activation memory).

    `guidance_interval` (low, high): guide only where low <= t / time_range <= high, t being the model timesteps
    the denoiser is called with and `time_range` the model timestep of t/T = 1 (the sampled process's
    `GaussianDiffusion.model_time_range`); other steps are the conditional model alone (scale 1, one forward).
    None guides at every step, exactly as without the option.

    Only the eps channels (as many as x has) are guided; the learned-variance channels after them are the
    conditional model's.

    An `SDMUNet` gets the masks as `FixedMasks`: each SPADE layer's scale and shift maps of them are computed at the
    denoiser's first call and reused at every later step (the same outputs, without most of the decoder's work;
    see `unet.FixedMasks`); any other model gets the tensors. Make a new denoiser when the weights change."""
    fixed = fixed_masks_for(model, one_hot.device)
    masks = fixed(one_hot)
    if guidance_scale <= 1.0:
        return lambda x, t: model(x, t, masks)
    null_mask = fixed(torch.zeros_like(one_hot))
    both_masks = fixed(torch.cat([one_hot, torch.zeros_like(one_hot)]))

    def combine(cond: torch.Tensor, null: torch.Tensor, channels: int) -> torch.Tensor:
        eps = null[:, :channels] + guidance_scale * (cond[:, :channels] - null[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    def cond_and_null(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batched:
            return model(torch.cat([x, x]), torch.cat([t, t]), both_masks).chunk(2)
        return model(x, t, masks), model(x, t, null_mask)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return combine(*cond_and_null(x, t), x.shape[1])

    if guidance_interval is None:
        return guided
    low, high = guidance_interval

    def guided_in_interval(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        fraction = t.double() / time_range
        inside = (fraction >= low) & (fraction <= high)
        if bool(inside.all()):  # the samplers' case: one step for the whole batch
            return guided(x, t)
        if not bool(inside.any()):
            return model(x, t, masks)
        cond, null = cond_and_null(x, t)  # a batch of mixed steps: guide only its rows inside
        return torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))), combine(cond, null, x.shape[1]), cond)

    return guided_in_interval


def fixed_masks_for(model: Callable, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor | FixedMasks]:
    """How the denoiser hands `model` its masks: as `FixedMasks` sharing one memory budget (a quarter of `device`'s
    free memory) when the model is an `SDMUNet` (also inside torch.compile), else as the plain one-hot tensors (any
    other callable, a wrapper or a test's stand-in, knows nothing of FixedMasks)."""
    if not isinstance(getattr(model, "_orig_mod", model), SDMUNet):
        return lambda one_hot: one_hot
    budget = MemoryBudget.quarter_of_free(device)
    return lambda one_hot: FixedMasks(one_hot, budget)


def guided_share(diffusion: GaussianDiffusion, guidance_interval: tuple[float, float] | list[float] | None) -> float:
    """The share of `diffusion`'s steps that run guided (the cond + null pair, two forwards' worth) with
    `guidance_interval` (None: every step)."""
    if guidance_interval is None:
        return 1.0
    fraction = diffusion.model_timesteps(torch.arange(diffusion.num_timesteps)).double() / diffusion.model_time_range
    return float(((fraction >= guidance_interval[0]) & (fraction <= guidance_interval[1])).double().mean())

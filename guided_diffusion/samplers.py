"""Samplers as plain functions of (diffusion, denoiser, starting noise, noise source).

Each sampler walks a `GaussianDiffusion` (the model's process or a respaced/rescaled one) from step T-1 down
to 0. `noise` is a callable returning fresh N×C×H×W noise: `PerImageNoise` draws it from one generator per
image, so image i is the same whatever the batch it is sampled in.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .diffusion import GaussianDiffusion, MeanVariance, _extract
from .guidance import Denoiser

NoiseSource = Callable[[], torch.Tensor]
Progress = Callable[[int], None]


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded with `seed` (independent streams per image)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PerImageNoise:
    """Gaussian noise drawn per image from its own CPU generator, then moved to `device`."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.shape = shape
        self.device = device

    def __call__(self) -> torch.Tensor:
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(self.device)


def _step_denoise(diffusion: GaussianDiffusion, denoise: Denoiser, x: torch.Tensor, step: int,
                  clip_denoised: bool) -> tuple[torch.Tensor, MeanVariance]:
    t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
    output = denoise(x, diffusion.model_timesteps(t)).float()
    return t, diffusion.p_mean_variance(output, x, t, clip_denoised)


def sample_ancestral(diffusion: GaussianDiffusion, denoise: Denoiser, x: torch.Tensor, noise: NoiseSource,
                     clip_denoised: bool = True, progress: Progress | None = None) -> torch.Tensor:
    """DDPM ancestral sampling with the model's learned variance (SDM's and ISDM's default sampler)."""
    for step in reversed(range(diffusion.num_timesteps)):
        _, out = _step_denoise(diffusion, denoise, x, step, clip_denoised)
        x = out.mean
        if step > 0:
            x = x + torch.exp(0.5 * out.log_variance) * noise()
        if progress:
            progress(1)
    return x


def ddim_step(diffusion: GaussianDiffusion, out: MeanVariance, x: torch.Tensor, t: torch.Tensor, eta: float,
              noise: NoiseSource) -> torch.Tensor:
    """One DDIM update from x_t to x_{t-1} given the model's prediction at t (eta = 0: deterministic)."""
    eps = diffusion.predict_eps_from_xstart(x, t, out.pred_xstart)
    alpha_bar = _extract(diffusion.alphas_cumprod, t, x)
    alpha_bar_prev = _extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    x_prev = out.pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    if eta > 0 and int(t[0]) > 0:
        x_prev = x_prev + sigma * noise()
    return x_prev


def sample_ddim(diffusion: GaussianDiffusion, denoise: Denoiser, x: torch.Tensor, noise: NoiseSource,
                eta: float = 0.0, clip_denoised: bool = True, progress: Progress | None = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) over the diffusion's steps; use a respaced diffusion for few steps."""
    for step in reversed(range(diffusion.num_timesteps)):
        t, out = _step_denoise(diffusion, denoise, x, step, clip_denoised)
        x = ddim_step(diffusion, out, x, t, eta, noise)
        if progress:
            progress(1)
    return x

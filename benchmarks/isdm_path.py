"""ISDM's sampling code path re-created on our network, for `speed.py --compare-naive` (the "naive" rows).

What ISDM's `p_sample_loop` does per step, operation for operation (RabJon/isdm, guided_diffusion/
gaussian_diffusion.py and respace.py, read for this; written here in our own words):
- the respaced process's wrapper maps the step indices through a tensor of kept timesteps that it builds at every
  call, then rescales them to 0..1000 (`rescale_timesteps`);
- `p_mean_variance` runs the model on the masks, then (guidance scale s > 1) a second, separate forward on
  all-zero masks, and overwrites the first output's image channels with null + s * (cond - null);
- every schedule value is taken from a float64 numpy array at each call (`torch.from_numpy(...)[t].float()`,
  broadcast to the image's shape);
- learned-range variance, x0 from eps, clipped to [-1, 1], the posterior mean, exp of the variance;
- `p_sample` draws the batch's noise with one `randn_like` and multiplies it by a mask that is 0 at the last step.
The network is ours (the weights are the same), with ISDM's attention in place of SDPA (`isdm_attention`: q and k
each scaled by d^-1/4, two einsums, softmax in float32) and plain one-hot tensors as conditions, so that SPADE
computes its maps at every forward as ISDM's network does.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from guided_diffusion.diffusion import GaussianDiffusion


def isdm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ISDM's legacy-order attention on batch x heads x length x channels tensors (our AttentionBlock's layout);
    it works on (batch * heads) x channels x length, as ISDM's QKVAttentionLegacy does."""
    b, heads, length, channels = q.shape
    q, k, v = (part.transpose(-1, -2).reshape(b * heads, channels, length) for part in (q, k, v))
    scale = 1 / math.sqrt(math.sqrt(channels))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    attended = torch.einsum("bts,bcs->bct", weight, v)
    return attended.reshape(b, heads, channels, length).transpose(-1, -2)


def _from_array(values: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """ISDM's _extract_into_tensor: values[t] from a numpy array, as float32, broadcast to `shape`."""
    out = torch.from_numpy(values).to(device=t.device)[t].float()
    while out.dim() < len(shape):
        out = out[..., None]
    return out.expand(shape)


class IsdmSampler:
    """ISDM's guided ancestral sampling over `diffusion`'s steps (a respaced process of the 1000-step one)."""

    def __init__(self, diffusion: GaussianDiffusion):
        self.timestep_map = diffusion.timestep_map.tolist()
        self.original_num_steps = diffusion.original_num_steps
        self.rescale = diffusion.rescale_timesteps
        self.num_timesteps = diffusion.num_timesteps
        arrays = ("betas", "posterior_log_variance_clipped", "sqrt_recip_alphas_cumprod",
                  "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2")
        self.arrays = {name: getattr(diffusion, name).numpy() for name in arrays}
        self.log_betas = np.log(self.arrays["betas"])

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        mapped = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]
        return mapped.float() * (1000.0 / self.original_num_steps) if self.rescale else mapped

    def p_sample(self, model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, s: float) -> torch.Tensor:
        channels = x.shape[1]
        output = model(x, self.model_time(t), labels)
        if s > 1.0:
            null = model(x, self.model_time(t), torch.zeros_like(labels))
            output[:, :channels] = null[:, :channels] + s * (output[:, :channels] - null[:, :channels])
        eps, var_values = torch.split(output, channels, dim=1)
        min_log = _from_array(self.arrays["posterior_log_variance_clipped"], t, x.shape)
        max_log = _from_array(self.log_betas, t, x.shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        _variance = torch.exp(log_variance)  # noqa: F841 (ISDM computes it for its returned dict)
        pred_xstart = (_from_array(self.arrays["sqrt_recip_alphas_cumprod"], t, x.shape) * x
                       - _from_array(self.arrays["sqrt_recipm1_alphas_cumprod"], t, x.shape) * eps).clamp(-1, 1)
        mean = (_from_array(self.arrays["posterior_mean_coef1"], t, x.shape) * pred_xstart
                + _from_array(self.arrays["posterior_mean_coef2"], t, x.shape) * x)
        noise = torch.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    def sample(self, model, x: torch.Tensor, labels: torch.Tensor, s: float, steps: int | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """The loop from the top step down; `steps` stops after that many (a warm-up); `progress(1)` after each."""
        indices = list(range(self.num_timesteps))[::-1][:steps]
        for i in indices:
            t = torch.tensor([i] * x.shape[0], device=x.device)
            with torch.no_grad():
                x = self.p_sample(model, x, t, labels, s)
            if progress:
                progress(1)
        return x

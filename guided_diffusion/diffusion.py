"""Gaussian diffusion with learned variance (Nichol & Dhariwal 2021), as the SDM trains and samples it.

One class serves the model's full 1000-step process and any respaced process (e.g. 300 or 50 steps): a respaced
diffusion keeps the original process's cumulative alphas at the chosen timesteps, and `model_timesteps` maps its
step indices back into the model's range (scaled to 0..1000 when `rescale_timesteps`). Schedules are computed in
float64 and cast to the tensors' dtype when used.

`p_mean_variance` takes the model's output rather than the model, so that guidance and samplers stay plain
functions around it (see `guidance.py` and `samplers.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

NOISE_SCHEDULES = ("linear", "cosine")


def make_betas(schedule: str, num_steps: int) -> np.ndarray:
    """The beta schedule of guided-diffusion: 'linear' (scaled to any step count) or 'cosine'."""
    if schedule == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if schedule == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                         for i in range(num_steps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {schedule!r}")


def space_timesteps(num_steps: int, section_counts: str | int | list[int]) -> list[int]:
    """Which of the original `num_steps` timesteps a respaced process keeps (sorted).

    `section_counts` is a step count (300), a list of counts per equal section ([10, 15, 20]), their
    comma-separated string form ("10,15,20"), or "ddimN" for the evenly strided steps DDIM uses.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == wanted:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot take exactly {wanted} strided steps from {num_steps}")
        section_counts = [int(part) for part in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_steps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def _extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] cast to like's dtype and shaped to broadcast over like (N×1×1×1)."""
    out = values.to(t.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL divergence between two diagonal Gaussians, elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of images in [-1, 1] quantised to 256 levels under a Gaussian, elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class MeanVariance:
    """The reverse step's Gaussian p(x_{t-1} | x_t) and what the model predicted."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor
    eps: torch.Tensor


PREDICTIONS = ("eps", "v")
"""What the model's first channels predict: eps (the SDM's, guided-diffusion's), or v = sqrt(a) eps - sqrt(1 - a) x0
(Salimans and Ho, ICLR 2022; a = alpha_bar), whose x0 = sqrt(a) x_t - sqrt(1 - a) v stays well conditioned where a
is near 0; an eps model's x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies its error by 1 / sqrt(a) there."""


class GaussianDiffusion:
    """A diffusion process whose model predicts eps (or v: `prediction`) and (with learn_sigma) interpolates its
    log-variance. Everything downstream of `p_mean_variance` (the samplers, guidance, the VB term) sees eps and
    x0 whatever the model predicts."""

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = True, rescale_timesteps: bool = False,
                 timestep_map: list[int] | None = None, original_num_steps: int | None = None,
                 prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps or self.num_timesteps
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(self.num_timesteps),
                                         dtype=torch.long)

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        arrays = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name, values in arrays.items():
            setattr(self, name, torch.from_numpy(values))

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, num_steps: int = 1000, noise_schedule: str = "linear", respacing: str | int | list[int] = "",
               *, learn_sigma: bool = True, rescale_timesteps: bool = False,
               prediction: str = "eps") -> GaussianDiffusion:
        """The model's `num_steps` process, respaced to `respacing` steps when given."""
        base = cls(make_betas(noise_schedule, num_steps), learn_sigma=learn_sigma,
                   rescale_timesteps=rescale_timesteps, prediction=prediction)
        if respacing in ("", None) or respacing == num_steps or respacing == str(num_steps):
            return base
        return base.respaced(space_timesteps(num_steps, respacing))

    def respaced(self, use_timesteps: list[int]) -> GaussianDiffusion:
        """A process over a subset of this one's timesteps with the same cumulative alphas there."""
        kept = sorted(set(use_timesteps))
        betas, last = [], 1.0
        for i in kept:
            alpha_cumprod = float(self.alphas_cumprod[i])
            betas.append(1.0 - alpha_cumprod / last)
            last = alpha_cumprod
        return GaussianDiffusion(np.array(betas), learn_sigma=self.learn_sigma,
                                 rescale_timesteps=self.rescale_timesteps,
                                 timestep_map=[int(self.timestep_map[i]) for i in kept],
                                 original_num_steps=self.original_num_steps, prediction=self.prediction)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps to feed the model for this process's step indices t."""
        mapped = self.timestep_map.to(t.device)[t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    @property
    def model_time_range(self) -> float:
        """The model timestep of diffusion time t/T = 1: `model_timesteps(t) / model_time_range` is step t's
        place in the model's process, from 0 (the last, nearly clean step) to (T-1)/T (the first, noisiest)."""
        return 1000.0 if self.rescale_timesteps else float(self.original_num_steps)

    # --- forward process ----------------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t),
                _extract(self.posterior_log_variance_clipped, t, x_t))

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def v_target(self, x_start, t, noise):
        """v = sqrt(a) eps - sqrt(1 - a) x0, a = alpha_bar_t: what a v-predicting model learns."""
        return (_extract(self.sqrt_alphas_cumprod, t, noise) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, noise) * x_start)

    def eps_and_xstart(self, x_t, t, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) from the model's prediction channels at (x_t, t), for either `prediction`."""
        if self.prediction == "v":
            a, b = _extract(self.sqrt_alphas_cumprod, t, x_t), _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
            return a * prediction + b * x_t, a * x_t - b * prediction
        return prediction, self.predict_xstart_from_eps(x_t, t, prediction)

    # --- reverse process ----------------------------------------------------------------------------------
    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True) -> MeanVariance:
        """p(x_{t-1} | x_t) from the model's output at (x_t, t): eps (or v), and the learned variance if any."""
        channels = x_t.shape[1]
        if self.learn_sigma:
            predicted, var_values = model_output.split(channels, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = _extract(self.log_betas, t, x_t)
            frac = (var_values + 1) / 2  # the model outputs values in [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            # Fixed large variance (betas, with the posterior variance at t = 0), as guided-diffusion.
            predicted = model_output
            fixed = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            variance = _extract(fixed, t, x_t).expand_as(x_t)
            log_variance = _extract(torch.log(fixed), t, x_t).expand_as(x_t)
        eps, pred_xstart = self.eps_and_xstart(x_t, t, predicted)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return MeanVariance(mean, variance, log_variance, pred_xstart, eps)

    # --- training -----------------------------------------------------------------------------------------
    def training_losses(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor, min_snr_gamma: float = 0.0,
                        pixel_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The hybrid loss per sample: MSE on eps (on v for a v model) + the variational bound for the learned
        variance.

        `model(x_t, model_timesteps)` returns the raw output. As in improved DDPM, the VB term sees the
        predicted mean detached, so it trains the variance only. With `min_snr_gamma` > 0 the loss takes the MSE
        weighted by `min_snr_weights` (the VB term unchanged); terms["mse"] stays the unweighted MSE.
        `pixel_weights` (broadcastable to x_start, e.g. B x 1 x H x W) weight each pixel's squared error in the
        loss's MSE, which is then their weighted mean (the mask generator's class weighting); None = all 1.
        """
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t))
        terms: dict[str, torch.Tensor] = {}
        if self.learn_sigma:
            predicted, var_values = model_output.split(x_t.shape[1], dim=1)
            frozen = torch.cat([predicted.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            predicted = model_output
        target = self.v_target(x_start, t, noise) if self.prediction == "v" else noise
        squared = (target - predicted) ** 2
        terms["mse"] = mean_flat(squared)
        mse = terms["mse"] if pixel_weights is None else mean_flat(squared * pixel_weights.to(squared))
        mse = mse * self.min_snr_weights(t, min_snr_gamma).to(mse) if min_snr_gamma else mse
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al., ICCV 2023) for an eps-predicting model: min(SNR(t), gamma) / SNR(t) per
        sample, float64, with SNR(t) = alpha_bar_t / (1 - alpha_bar_t). It is 1 where SNR <= gamma (noisy steps) and
        gamma / SNR below that, so the nearly clean steps, whose eps is hard to predict and matters little for the
        image, stop dominating the gradient. For a v model, min(SNR(t), gamma) / (SNR(t) + 1): the squared v error
        is the squared x0 error times SNR + 1 (the eps error's, times SNR), so both weight the x0 error by
        min(SNR, gamma)."""
        alpha_bar = self.alphas_cumprod.to(t.device)[t]
        snr = alpha_bar / (1.0 - alpha_bar)
        return snr.clamp(max=gamma) / (snr + 1.0 if self.prediction == "v" else snr)

    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """The variational bound term in bits per dimension: KL(q || p) for t > 0, the decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out.mean, 0.5 * out.log_variance)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

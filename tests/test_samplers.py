"""Samplers: DPM-Solver++(2M) against a closed-form ODE, its step grid, convergence on a tiny SDM, guidance in one
batched forward, and the `sampler` / `steps` config keys end to end."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch

from conftest import TINY_MODEL
from guided_diffusion.config import config_from_dict
from guided_diffusion.diffusion import GaussianDiffusion, make_betas, space_timesteps
from guided_diffusion.errors import ConfigError
from guided_diffusion.guidance import conditional_denoiser
from guided_diffusion.sampling.sample import DEFAULT_SOLVER_STEPS, sampling_diffusion
from guided_diffusion.samplers import PerImageNoise, log_snr_timesteps, run_sampler
from guided_diffusion.unet import FixedMasks, MemoryBudget, SDMUNet, SPADEGroupNorm

PROCESS = GaussianDiffusion.create(1000, "linear", learn_sigma=False)


def gaussian_data_denoiser(variance: float):
    """The exact eps-prediction when the data are N(0, variance): eps = sqrt(1 - a) x / (a variance + 1 - a)."""
    alpha_bar = PROCESS.alphas_cumprod

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_bar[t.long()].reshape(-1, 1, 1, 1)
        return torch.sqrt(1 - a) * x / (a * variance + 1 - a)

    return denoise


def exact_ode_result(x_T: torch.Tensor, variance: float) -> torch.Tensor:
    """Probability-flow ODE from step 999 to step 0 for Gaussian data (x / std(x_t) is constant along it),
    followed by the x0 prediction at step 0, which is what the samplers return."""
    a0, aT = float(PROCESS.alphas_cumprod[0]), float(PROCESS.alphas_cumprod[999])
    x_0 = x_T * math.sqrt(a0 * variance + 1 - a0) / math.sqrt(aT * variance + 1 - aT)
    eps = gaussian_data_denoiser(variance)(x_0, torch.zeros(len(x_T)))
    return (x_0 - math.sqrt(1 - a0) * eps) / math.sqrt(a0)


def solve(sampler: str, steps: int, x_T: torch.Tensor, denoise, grid=None) -> torch.Tensor:
    kept = grid(steps) if grid else log_snr_timesteps(PROCESS, steps)
    return run_sampler(sampler, PROCESS.respaced(kept), denoise, x_T, noise=None, clip_denoised=False)


@pytest.mark.parametrize("variance", [0.25, 0.01])
def test_dpm_solver_converges_to_the_exact_ode_solution_faster_than_ddim(variance):
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact, denoise = exact_ode_result(x_T, variance), gaussian_data_denoiser(variance)
    error = {(name, k): (solve(name, k, x_T, denoise) - exact).abs().max().item()
             for name in ("ddim", "dpm++2m") for k in (10, 25, 100)}
    for k in (10, 25, 100):
        assert error["dpm++2m", k] < 0.5 * error["ddim", k]
    assert error["dpm++2m", 100] < error["dpm++2m", 25] < error["dpm++2m", 10]
    assert error["dpm++2m", 100] < 2e-3


def test_log_snr_grid_beats_time_uniform_steps_at_few_steps():
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact, denoise = exact_ode_result(x_T, 0.01), gaussian_data_denoiser(0.01)
    for k in (10, 15, 25):
        log_snr = (solve("dpm++2m", k, x_T, denoise) - exact).abs().max().item()
        uniform = (solve("dpm++2m", k, x_T, denoise, lambda n: space_timesteps(1000, str(n))) - exact).abs().max()
        assert log_snr < uniform.item()


@pytest.mark.parametrize("steps", [1, 2, 10, 20, 250, 1000])
def test_log_snr_grid_has_distinct_steps_from_last_to_first(steps):
    grid = log_snr_timesteps(PROCESS, steps)
    assert len(grid) == steps == len(set(grid)) and grid == sorted(grid)
    assert grid[-1] == 999 and (steps == 1 or grid[0] == 0)


def test_log_snr_grid_refuses_more_steps_than_the_process_has():
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        log_snr_timesteps(PROCESS, 1001)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config, _ = config_from_dict("train", {"data_dir": "unused", "num_classes": 3, **TINY_MODEL})
    model = SDMUNet(config.unet_spec()).eval()
    for p in model.parameters():  # zero-initialised output layers would make every sampler trivially agree
        p.data.add_(0.02 * torch.randn_like(p))
    return model


def masks_for(batch: int, classes: int = 3) -> torch.Tensor:
    labels = torch.randint(0, classes, (batch, 32, 32), generator=torch.Generator().manual_seed(2))
    return torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float()


def test_guidance_in_one_batched_forward_equals_two_forwards(tiny_model):
    one_hot, x = masks_for(2), torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        batched = conditional_denoiser(tiny_model, one_hot, 3.0, batched=True)(x, t)
        separate = conditional_denoiser(tiny_model, one_hot, 3.0, batched=False)(x, t)
    assert batched.shape == (2, 6, 32, 32)
    assert torch.allclose(batched, separate, atol=1e-5)


@contextmanager
def count_spade_map_computations(model: SDMUNet):
    """Yields a one-item list counting the calls of every SPADE layer's first convolution (its maps computed)."""
    calls = [0]
    handles = [module.mlp_shared.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for module in model.modules() if isinstance(module, SPADEGroupNorm)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_fixed_masks_compute_the_spade_maps_once_and_give_the_plain_forward_to_the_bit(tiny_model, autocast):
    one_hot = masks_for(2)
    fixed = FixedMasks(one_hot)
    layers = sum(isinstance(m, SPADEGroupNorm) for m in tiny_model.modules())
    generator = torch.Generator().manual_seed(4)
    with count_spade_map_computations(tiny_model) as calls, torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for t in (999.0, 500.0, 3.0):
            x = torch.randn(2, 3, 32, 32, generator=generator)
            timesteps = torch.full((2,), t)
            assert torch.equal(tiny_model(x, timesteps, fixed), tiny_model(x, timesteps, one_hot))
    assert calls[0] == layers + 3 * layers  # the fixed masks' maps once; the plain tensor's at every forward
    assert fixed.kept_bytes > 0


def test_fixed_masks_past_their_memory_budget_compute_the_maps_at_every_forward(tiny_model):
    one_hot, x, t = masks_for(1), torch.randn(1, 3, 32, 32), torch.tensor([400.0])
    unkept = FixedMasks(one_hot, MemoryBudget(0))
    layers = sum(isinstance(m, SPADEGroupNorm) for m in tiny_model.modules())
    with count_spade_map_computations(tiny_model) as calls, torch.no_grad():
        outputs = [tiny_model(x, t, unkept) for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], tiny_model(x, t, one_hot))
    assert calls[0] == 2 * layers and unkept.kept_bytes == 0  # computed at each of the 2 forwards


def test_fixed_masks_sharing_a_budget_keep_no_more_than_it_between_them(tiny_model):
    one_hot, x, t = masks_for(1), torch.randn(1, 3, 32, 32), torch.tensor([400.0])
    with torch.no_grad():
        alone = FixedMasks(one_hot, MemoryBudget(2 ** 40))
        tiny_model(x, t, alone)
        budget = MemoryBudget(alone.kept_bytes)  # room for one set of maps
        first, second = FixedMasks(one_hot, budget), FixedMasks(torch.zeros_like(one_hot), budget)
        tiny_model(x, t, first)
        tiny_model(x, t, second)
    assert first.kept_bytes == alone.kept_bytes > 0 and second.kept_bytes == 0 and budget.left_bytes == 0


def test_a_guided_ancestral_run_is_the_same_with_the_masks_maps_kept(tiny_model):
    """The product's denoiser (FixedMasks inside) against guidance written out over the plain one-hot tensor."""
    one_hot, scale = masks_for(2), 1.5
    both = torch.cat([one_hot, torch.zeros_like(one_hot)])

    def plain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, null = tiny_model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return torch.cat([null[:, :3] + scale * (cond[:, :3] - null[:, :3]), cond[:, 3:]], dim=1)

    diffusion = GaussianDiffusion.create(300, "linear", "6", rescale_timesteps=True)
    runs = []
    with torch.no_grad():
        for denoise in (conditional_denoiser(tiny_model, one_hot, scale), plain):
            noise = PerImageNoise([5, 6], (3, 32, 32))
            runs.append(run_sampler("ancestral", diffusion, denoise, noise(), noise))
    assert torch.equal(runs[0], runs[1])


def test_dpm_solver_converges_on_a_tiny_sdm(tiny_model):
    """Against its own 150-step solution (the ODE's, to about 1e-3 on the Gaussian case above)."""
    model_process = GaussianDiffusion.create(1000, "linear", rescale_timesteps=True)
    noise = PerImageNoise([3], (3, 32, 32))
    x_T = noise()

    def solve_tiny(k: int) -> torch.Tensor:
        diffusion = model_process.respaced(log_snr_timesteps(model_process, k))
        return run_sampler("dpm++2m", diffusion, denoise, x_T, noise, clip_denoised=False)

    with torch.no_grad():
        denoise = conditional_denoiser(tiny_model, masks_for(1), 1.5)
        reference = solve_tiny(150)
        errors = [(solve_tiny(k) - reference).abs().mean().item() for k in (5, 15, 40)]
    assert errors[2] < errors[1] < errors[0]


def sample_config(**changes):
    return config_from_dict("sample", {"data_dir": "d", "model_path": "m", **changes})[0]


def test_dpm_solver_samples_its_default_steps_of_the_model_process():
    diffusion = sampling_diffusion(sample_config(sampler="dpm++2m"))
    assert diffusion.num_timesteps == DEFAULT_SOLVER_STEPS
    assert diffusion.timestep_map[0] == 0 and diffusion.timestep_map[-1] == 999


def test_steps_respace_the_model_process_for_every_sampler():
    for sampler in ("ancestral", "ddim", "dpm++2m"):
        assert sampling_diffusion(sample_config(sampler=sampler, steps=12)).num_timesteps == 12


def test_use_ddim_is_isdms_spelling_of_the_ddim_sampler():
    assert sample_config(use_ddim=True).sampler == "ddim"
    with pytest.raises(ConfigError, match="key 'use_ddim' is true but 'sampler' is 'dpm\\+\\+2m'"):
        sample_config(use_ddim=True, sampler="dpm++2m")


@pytest.mark.parametrize("changes, message", [
    ({"sampler": "euler"}, "key 'sampler' must be one of 'ancestral', 'ddim', 'dpm\\+\\+2m'"),
    ({"steps": -1}, "key 'steps' must be >= 0"),
    ({"steps": 10, "timestep_respacing": "10"}, "key 'steps' and 'timestep_respacing' both choose"),
])
def test_bad_sampler_keys_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        sample_config(**changes)


def test_more_steps_than_the_model_was_trained_with_is_refused():
    with pytest.raises(ConfigError, match="key 'steps' is 1200 but the model was trained with 1000"):
        sampling_diffusion(sample_config(sampler="dpm++2m", steps=1200))


def test_dpm_solver_end_to_end_writes_samples(demo_dir, trained_run, tmp_path):
    from test_sample import pngs, sample
    run_dir = sample(demo_dir, trained_run, tmp_path, sampler="dpm++2m", steps=4, timestep_respacing="")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["sampler"], summary["steps"]) == ("dpm++2m", 4)
    assert len(pngs(run_dir / "samples")) == 3


# --- guidance in a limited interval (guidance_interval) -------------------------------------------------------

class CountingModel(torch.nn.Module):
    """The tiny model, counting the images it evaluates (a batched cond + null forward of B images counts 2B)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.images, self.calls = model, 0, 0

    def forward(self, x, t, y):
        self.images += x.shape[0]
        self.calls += 1
        return self.model(x, t, y)


def interval_run(tiny_model, sampler: str, interval, scale: float = 1.5, batched: bool = True,
                 diffusion: GaussianDiffusion | None = None):
    """Two images sampled from fixed seeds over a 10-step process; the images and the counting model."""
    model_process = GaussianDiffusion.create(1000, "linear", rescale_timesteps=True)
    diffusion = diffusion or model_process.respaced(
        log_snr_timesteps(model_process, 10) if sampler == "dpm++2m" else space_timesteps(1000, "10"))
    noise = PerImageNoise([5, 6], (3, 32, 32))
    counting = CountingModel(tiny_model)
    with torch.no_grad():
        denoise = conditional_denoiser(counting, masks_for(2), scale, batched=batched, guidance_interval=interval,
                                       time_range=diffusion.model_time_range)
        images = run_sampler(sampler, diffusion, denoise, noise(), noise)
    return images, counting


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm++2m"])
def test_a_guidance_interval_covering_every_step_samples_bit_for_bit_as_without(tiny_model, sampler):
    without, _ = interval_run(tiny_model, sampler, None)
    covering, _ = interval_run(tiny_model, sampler, [0.0, 1.0])
    assert torch.equal(without, covering)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm++2m"])
def test_steps_outside_the_interval_run_one_forward_of_the_conditional_model(tiny_model, sampler):
    model_process = GaussianDiffusion.create(1000, "linear", rescale_timesteps=True)
    grid = log_snr_timesteps(model_process, 10) if sampler == "dpm++2m" else space_timesteps(1000, "10")
    inside = sum(0.2 <= step / 1000 <= 0.6 for step in grid)
    assert 0 < inside < 10
    _, everywhere = interval_run(tiny_model, sampler, None)
    limited, counting = interval_run(tiny_model, sampler, [0.2, 0.6])
    assert everywhere.images == 2 * 2 * 10  # batch 2, cond + null, 10 steps
    assert counting.images == 2 * 2 * inside + 2 * (10 - inside)
    assert counting.calls == everywhere.calls == 10  # batched: one forward per step either way
    _, separate = interval_run(tiny_model, sampler, [0.2, 0.6], batched=False)
    assert separate.calls == 2 * inside + (10 - inside)
    assert not torch.equal(limited, interval_run(tiny_model, sampler, None)[0])


def test_an_interval_holding_no_step_samples_bit_for_bit_as_no_guidance(tiny_model):
    unguided, _ = interval_run(tiny_model, "ddim", None, scale=1.0)
    outside, counting = interval_run(tiny_model, "ddim", [0.9995, 1.0])
    assert torch.equal(unguided, outside) and counting.images == 2 * 10


def test_the_interval_is_a_fraction_of_the_model_time_of_any_process(tiny_model):
    """A rescaled 40-step schedule like ISDM's 300-step one (model time t * 1000 / 40) and a 1000-step process
    without rescaling (model time = step): steps 0..T-1 are at t/T, so [0, 0.5) of either holds half its steps."""
    rescaled = GaussianDiffusion(make_betas("linear", 40), rescale_timesteps=True)
    plain = GaussianDiffusion.create(1000, "linear", rescale_timesteps=False).respaced(list(range(0, 1000, 100)))
    for diffusion, steps in ((rescaled, 40), (plain, 10)):
        _, counting = interval_run(tiny_model, "ddim", [0.0, 0.499], diffusion=diffusion)
        assert counting.images == 2 * 2 * (steps // 2) + 2 * (steps // 2)


def test_a_batch_of_mixed_steps_guides_only_the_images_inside(tiny_model):
    one_hot, x = masks_for(2), torch.randn(2, 3, 32, 32)
    t = torch.tensor([100.0, 800.0])
    with torch.no_grad():
        mixed = conditional_denoiser(tiny_model, one_hot, 2.0, guidance_interval=[0.5, 1.0])(x, t)
        guided = conditional_denoiser(tiny_model, one_hot, 2.0)(x, t)
        plain = tiny_model(x, t, one_hot)
    assert torch.allclose(mixed[1], guided[1], atol=1e-5) and torch.allclose(mixed[0], plain[0], atol=1e-5)
    assert not torch.allclose(mixed[0], guided[0], atol=1e-3)


@pytest.mark.parametrize("interval", [[0.5, 0.2], [0.3, 0.3], [-0.1, 0.5], [0.2, 1.5], [0.5], [0.1, 0.2, 0.3]])
def test_a_bad_guidance_interval_is_one_line_naming_the_key(interval):
    with pytest.raises(ConfigError) as info:
        config_from_dict("sample", {"data_dir": "d", "model_path": "m", "guidance_interval": interval}, "x.json")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("x.json: key 'guidance_interval' must be [low, high] with 0 <= low < high <= 1")
    assert str(interval) in message


def test_a_guidance_interval_of_the_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="key 'guidance_interval' must be a list of a number or null, got \"0.5\""):
        sample_config(guidance_interval="0.5")


def test_guidance_interval_defaults_to_every_step():
    assert sample_config().guidance_interval is None
    assert sample_config(guidance_interval=[0, 1]).guidance_interval == [0.0, 1.0]


def test_a_model_other_than_the_sdm_unet_gets_its_masks_as_plain_tensors(tiny_model):
    seen = []

    def wrapper(x, t, masks):
        seen.append(type(masks))
        return tiny_model(x, t, masks)

    one_hot, x, t = masks_for(1), torch.randn(1, 3, 32, 32), torch.tensor([300])
    with torch.no_grad():
        wrapped = conditional_denoiser(wrapper, one_hot, 1.5)(x, t)
        direct = conditional_denoiser(tiny_model, one_hot, 1.5)(x, t)
    assert seen == [torch.Tensor] and torch.equal(wrapped, direct)

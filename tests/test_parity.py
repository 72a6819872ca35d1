"""Parity with the reference SDM numerics in ../shared/fixtures/sdm_parity.

`tiny_sdm.pt` holds a tiny SDM (32 px, 32 channels, 3 classes), its reference config, and vectors computed with
the reference implementation: model output, q_sample, the hybrid loss terms, p_mean_variance of the rescaled
300-step process with and without guidance, the 50-step respacing map and one DDIM step. Every vector must match
to 1e-4 absolute in fp32.

pred_xstart = x_t / sqrt(a_t) - sqrt(1/a_t - 1) * eps multiplies the model's fp32 rounding (~3e-6 here, the same
between our fp32 and fp64 runs) by up to 1/sqrt(a_t) ~ 150 near t = T, so it is compared in eps units: its
error divided by sqrt(1/a_t - 1).
"""

import json
from pathlib import Path

import pytest
import torch

from guided_diffusion.config import config_from_dict
from guided_diffusion.diffusion import GaussianDiffusion, make_betas, space_timesteps
from guided_diffusion.guidance import conditional_denoiser
from guided_diffusion.samplers import ddim_step
from guided_diffusion.unet import SDMUNet

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sdm_parity"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "tiny_sdm.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def model(reference):
    keys = {k: v for k, v in reference["config"].items() if k not in ("use_fp16",)}
    config, _ = config_from_dict("train", {**keys, "data_dir": "unused"}, "tiny_sdm.pt")
    net = SDMUNet(config.unet_spec())
    net.load_state_dict(reference["state_dict"], strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def vectors(reference):
    return reference["vectors"]


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_pred_xstart_close(diffusion, t, ours, ref):
    amplification = diffusion.sqrt_recipm1_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert ((ours.double() - ref.double()).abs() / amplification).max().item() < TOL


def test_model_output_matches_reference(model, vectors):
    with torch.no_grad():
        out = model(vectors["x0"], vectors["t"], vectors["y"])
    assert max_error(out, vectors["model_out"]) < TOL


def test_one_hot_in_fixture_is_made_from_the_label(vectors):
    from guided_diffusion.data import one_hot
    assert torch.equal(one_hot(vectors["label"], 3), vectors["y"])


def test_q_sample_matches_reference(vectors):
    diffusion = GaussianDiffusion.create(1000, "linear")
    assert max_error(diffusion.q_sample(vectors["x0"], vectors["t"], vectors["noise"]), vectors["q_sample"]) < TOL


def test_hybrid_loss_terms_match_reference(model, vectors):
    diffusion = GaussianDiffusion.create(1000, "linear")
    with torch.no_grad():
        terms = diffusion.training_losses(lambda x, t: model(x, t, vectors["y"]), vectors["x0"], vectors["t"],
                                          vectors["noise"])
    for name in ("loss", "mse", "vb"):
        assert max_error(terms[name], vectors[f"train_{name}"]) < TOL, name


@pytest.mark.parametrize("scale", [1.5, 1.0])
def test_rescaled_300_step_p_mean_variance_matches_reference(model, vectors, scale):
    diffusion = GaussianDiffusion(make_betas("linear", 300), rescale_timesteps=True)
    x_t, t = vectors["x_t"], vectors["t300"]
    denoise = conditional_denoiser(model, vectors["y"], scale)
    with torch.no_grad():
        out = diffusion.p_mean_variance(denoise(x_t, diffusion.model_timesteps(t)), x_t, t, clip_denoised=True)
    key = f"p300_s{scale:g}"
    assert max_error(out.mean, vectors[f"{key}_mean"]) < TOL
    if scale == 1.5:
        assert max_error(out.variance, vectors[f"{key}_variance"]) < TOL
        assert max_error(out.log_variance, vectors[f"{key}_log_variance"]) < TOL
        assert_pred_xstart_close(diffusion, t, out.pred_xstart, vectors[f"{key}_pred_xstart"])


def test_rescaled_timesteps_reach_the_model_in_its_1000_step_range(vectors):
    diffusion = GaussianDiffusion(make_betas("linear", 300), rescale_timesteps=True)
    assert diffusion.model_timesteps(vectors["t300"]).tolist() == pytest.approx([299 * 1000 / 300, 150 * 1000 / 300])


def test_50_step_respacing_map_matches_reference(vectors):
    assert space_timesteps(1000, "50") == vectors["respaced50_timestep_map"].tolist()
    diffusion = GaussianDiffusion.create(1000, "linear", "50")
    assert diffusion.timestep_map.tolist() == vectors["respaced50_timestep_map"].tolist()


def test_ddim_step_matches_reference(model, vectors):
    diffusion = GaussianDiffusion.create(1000, "linear", "50")
    x_t, t = vectors["x_t"], vectors["t50"]
    with torch.no_grad():
        out = diffusion.p_mean_variance(model(x_t, diffusion.model_timesteps(t), vectors["y"]), x_t, t, True)
    sample = ddim_step(diffusion, out, x_t, t, eta=0.0, noise=lambda: torch.zeros_like(x_t))
    assert max_error(sample, vectors["ddim50_sample"]) < TOL
    assert_pred_xstart_close(diffusion, t, out.pred_xstart, vectors["ddim50_pred_xstart"])


def test_full_size_model_has_the_reference_names_and_shapes():
    reference = json.loads((FIXTURES / "isdm_256_state_dict_shapes.json").read_text())
    config, _ = config_from_dict("train", {"data_dir": "unused", "num_classes": 6, "image_size": 256,
                                           "num_channels": 256, "num_res_blocks": 2,
                                           "attention_resolutions": "32,16,8", "num_head_channels": 64})
    with torch.device("meta"):
        net = SDMUNet(config.unet_spec())
    shapes = {name: list(p.shape) for name, p in net.state_dict().items()}
    assert shapes == reference["state_dict_shapes"]
    assert len(shapes) == 766
    assert sum(p.numel() for p in net.state_dict().values()) == reference["num_parameters"] == 652_256_518


def test_guided_denoiser_uses_one_batched_forward(model, vectors):
    calls = []

    def counting_model(x, t, y):
        calls.append(x.shape[0])
        return model(x, t, y)

    denoise = conditional_denoiser(counting_model, vectors["y"], 1.5)
    with torch.no_grad():
        denoise(vectors["x_t"], torch.tensor([500, 500]))
    assert calls == [4]

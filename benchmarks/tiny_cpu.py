"""Prints training images/s and sampling s/image for the tiny 32 px config (the one the tests use).

    python benchmarks/tiny_cpu.py [--device cpu|cuda] [--batch-size 8] [--steps 10]

Timings exclude the first (warm-up) step. Sampling is guided (s = 1.5, cond + null in one batched forward).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.config import config_from_dict  # noqa: E402
from guided_diffusion.data import one_hot  # noqa: E402
from guided_diffusion.diffusion import GaussianDiffusion, make_betas  # noqa: E402
from guided_diffusion.guidance import conditional_denoiser  # noqa: E402
from guided_diffusion.samplers import PerImageNoise, sample_ancestral  # noqa: E402
from guided_diffusion.unet import SDMUNet  # noqa: E402

TINY = {"data_dir": "unused", "num_classes": 6, "image_size": 32, "num_channels": 32, "num_res_blocks": 1,
        "channel_mult": "1,2,2", "attention_resolutions": "16", "num_head_channels": 32}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--sample-steps", type=int, default=50, help="guided ancestral steps timed")
    args = parser.parse_args()
    torch.manual_seed(0)
    config, _ = config_from_dict("train", TINY)
    device = torch.device(args.device)
    model = SDMUNet(config.unet_spec()).to(device)
    diffusion = GaussianDiffusion.create(1000, "linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, size = args.batch_size, config.image_size
    images = torch.rand(b, 3, size, size, device=device) * 2 - 1
    labels = one_hot(torch.randint(0, 6, (b, size, size)), 6).to(device)

    def train_step() -> None:
        t = torch.randint(0, 1000, (b,), device=device)
        loss = diffusion.training_losses(lambda x, ts: model(x, ts, labels), images, t,
                                         torch.randn_like(images))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_ips = args.steps * b / (time.perf_counter() - start)

    model.eval()
    sampler_diffusion = GaussianDiffusion(make_betas("linear", args.sample_steps), rescale_timesteps=True)
    noise = PerImageNoise(list(range(b)), (3, size, size), device)
    with torch.no_grad():
        denoise = conditional_denoiser(model, labels, 1.5)
        start = time.perf_counter()
        sample_ancestral(sampler_diffusion, denoise, noise(), noise)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step_image = (time.perf_counter() - start) / (args.sample_steps * b)
    threads = torch.get_num_threads()
    print(f"tiny config (32 px, 32 channels, 6 classes, {sum(p.numel() for p in model.parameters()):,} params), "
          f"device {device}, {threads} threads, fp32, batch {b}")
    print(f"train:  {train_ips:.2f} images/s")
    print(f"sample: {per_step_image * 300:.2f} s/image for 300 guided ancestral steps "
          f"({per_step_image * 1000:.2f} ms per image-step, measured over {args.sample_steps} steps)")


if __name__ == "__main__":
    main()

"""Quality guard for few-step sampling: are DPM-Solver++ samples as good as ISDM's 300 ancestral steps?

    python benchmarks/quality_guard.py --model <train/finetune run or .pt> --data-dir <dataset> [--num-images 16]

Every run samples the same masks (the checkpoint's held-out val split) from the same starting noise x_T (per-image
seeds) with guidance scale s. Printed per sampler and step count:
- `dist ancestral300`: mean absolute pixel difference (0..255) to the 300-step ancestral images. Ancestral
  sampling draws fresh noise at every step, so even another 300-step ancestral run from the same x_T differs;
  that run ("ancestral 300, other step noise") is printed as the floor of what "the same quality" can mean.
- `dist ode`: difference to DPM-Solver++ at 100 steps (the converged deterministic result from that x_T);
  shows how far each run is from converged.
- `--reference-steps N` shortens both ancestral references to ISDM's rescaled N-step schedule: only for a quick run
  of this script (the tests), since the question is the 300-step one.
- `label alignment mIoU`: a segmenter (evaluation/, Unet++ resnet18 from scratch) trained on the real training
  split segments each run's images; mIoU against the masks that conditioned them (SDM's measure of whether the
  samples follow their masks). The same segmenter on the real val images gives the ceiling.
- `s/image`: wall time per image on this machine.
The fast samplers (`--solvers`, each at every `--solver-steps`) run in fp32 and, with `--bf16`, also under bf16
autocast; the references stay fp32. With `--guidance-interval` every run, the references included, guides only
inside the interval, so `dist ode` is the distance to that guidance's own converged result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.config import config_from_dict  # noqa: E402
from guided_diffusion.errors import ConfigError  # noqa: E402
from guided_diffusion.data import SegmentationDataset, index_dataset, one_hot, split_train_val  # noqa: E402
from guided_diffusion.run_folder import to_uint8_image  # noqa: E402
from guided_diffusion.sampling.sample import load_sampling_model, sampling_denoiser, sampling_diffusion  # noqa: E402
from guided_diffusion.samplers import SAMPLERS, PerImageNoise, image_seed, run_sampler  # noqa: E402


def sample_run(model, config, trained, masks: torch.Tensor, sampler: str, steps: int, seed: int,
               step_noise_seed: int, batch_size: int, bf16: bool = False,
               schedule_steps: int = 300) -> tuple[np.ndarray, float]:
    """uint8 images (N, H, W, 3) for `masks` (a grey model's repeated to RGB) and the seconds per image. x_T comes
    from the per-image seeds of `seed`; the noise drawn during sampling from those of `step_noise_seed` (equal
    seeds: one stream). `bf16`: the model runs under bf16 autocast (the solver's arithmetic stays fp32). `steps` 0:
    ISDM's rescaled schedule of `schedule_steps` steps."""
    run_config, _ = config_from_dict("sample", {**vars(config), "sampler": sampler, "steps": steps,
                                                "diffusion_steps": schedule_steps, "use_ddim": False,
                                                "timestep_respacing": "", "balance_args": None})
    diffusion = sampling_diffusion(run_config, trained)
    size, channels, outputs, start = config.image_size, config.image_channels, [], time.perf_counter()
    for first in range(0, len(masks), batch_size):
        ids = list(range(first, min(first + batch_size, len(masks))))
        start_noise = PerImageNoise([image_seed(seed, i) for i in ids], (channels, size, size))
        step_noise = (start_noise if step_noise_seed == seed else
                      PerImageNoise([image_seed(step_noise_seed, i) for i in ids], (channels, size, size)))
        x_T = start_noise()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            denoise = sampling_denoiser(run_config, model, one_hot(masks[ids], config.num_classes), diffusion)
            images = run_sampler(sampler, diffusion, denoise, x_T, step_noise, clip_denoised=True)
        outputs += [to_uint8_image(image) for image in images]
    return np.stack(outputs), (time.perf_counter() - start) / len(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint, or a train/finetune run folder")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--s", type=float, default=1.5)
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="guide only at diffusion times t/T in [LOW, HIGH] (key guidance_interval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solver-steps", default="10,15,25")
    parser.add_argument("--solvers", default="dpm++2m", help="comma-separated fast samplers run at each of "
                        "--solver-steps (dpm++2m, ddim)")
    parser.add_argument("--bf16", action="store_true", help="also run each fast sampler under bf16 autocast (the "
                        "references stay fp32)")
    parser.add_argument("--segmenter-steps", type=int, default=400, help="0 = skip the label-alignment score")
    parser.add_argument("--reference-steps", type=int, default=300, help="steps of ISDM's rescaled schedule for the "
                        "ancestral references (300, ISDM's; fewer only for a quick run of this script)")
    args = parser.parse_args()
    unknown = [name for name in args.solvers.split(",") if name not in SAMPLERS]
    if unknown:
        parser.error(f"--solvers: unknown sampler(s) {', '.join(unknown)}; expected some of {', '.join(SAMPLERS)}")

    try:  # the references' schedule, checked as the sample config checks it
        config_from_dict("sample", {"data_dir": args.data_dir, "model_path": args.model,
                                    "diffusion_steps": args.reference_steps})
    except ConfigError as error:
        parser.error(f"--reference-steps {args.reference_steps}: {str(error).removeprefix('config: ')}")
    base, _ = config_from_dict("sample", {"data_dir": args.data_dir, "model_path": args.model, "s": args.s,
                                          "guidance_interval": args.guidance_interval, "seed": args.seed,
                                          "device": "cpu"})
    config, trained, model, path = load_sampling_model(base, set(), "quality_guard", torch.device("cpu"))
    index = index_dataset(config.data_dir, config.dataset_mode, config.num_classes, require_test=False)
    train_pairs, val_pairs = split_train_val(index.train, trained.val_fraction, trained.seed)
    chosen = [val_pairs[i % len(val_pairs)] for i in range(args.num_images)]
    val = SegmentationDataset(chosen, config.image_size, config.dataset_mode, config.resize_mode,
                              image_channels=config.image_channels)
    items = [val[i] for i in range(len(val))]
    masks = torch.stack([item["mask"] for item in items])
    print(f"model {path}; {len(masks)} val masks at {config.image_size} px, guidance s={config.s}"
          f"{'' if config.guidance_interval is None else f' at t/T in {config.guidance_interval}'}", flush=True)

    runs = [("ancestral", 0, args.seed, False), ("ancestral", 0, args.seed + 1, False),
            ("dpm++2m", 100, args.seed, False), ("ddim", 50, args.seed, False), ("ancestral", 50, args.seed, False)]
    for solver in args.solvers.split(","):
        runs += [(solver, int(k), args.seed, bf16) for k in args.solver_steps.split(",")
                 for bf16 in ((False, True) if args.bf16 else (False,))]
    results = {}
    for sampler, steps, noise_seed, bf16 in runs:
        images, seconds = sample_run(model, config, trained, masks, sampler, steps, args.seed, noise_seed,
                                     args.batch_size, bf16, args.reference_steps)
        results[sampler, steps, noise_seed, bf16] = (images, seconds)
        print(f"  sampled {sampler} {steps or args.reference_steps} steps (step noise seed {noise_seed}"
              f"{', bf16' if bf16 else ''}): {seconds:.2f} s/image", flush=True)

    alignment = {}
    if args.segmenter_steps:
        from evaluation.segmenter.model import SegmenterSpec, TrainSettings, train_segmenter
        from evaluation.segmenter.run import Scoring, score  # score on generated images = label alignment
        train = SegmentationDataset(train_pairs, config.image_size, config.dataset_mode, config.resize_mode,
                                    image_channels=config.image_channels)
        real_images = np.stack([to_uint8_image(train[i]["image"]) for i in range(len(train))])
        real_masks = np.stack([train[i]["mask"].numpy() for i in range(len(train))])
        segmenter, _ = train_segmenter(real_images, real_masks, SegmenterSpec("unetplusplus", config.num_classes),
                                       TrainSettings(steps=args.segmenter_steps, batch_size=16), progress=False)
        val_images = np.stack([to_uint8_image(item["image"]) for item in items])
        alignment["real val images (ceiling)"] = score(segmenter, val_images, masks.numpy(),
                                                       Scoring(config.num_classes)).miou
        for key, (images, _) in results.items():
            alignment[key] = score(segmenter, images, masks.numpy(), Scoring(config.num_classes)).miou

    reference = results["ancestral", 0, args.seed, False][0].astype(np.float64)
    ode = results["dpm++2m", 100, args.seed, False][0].astype(np.float64)
    print(f"\n| sampler | steps | dist ancestral{args.reference_steps} | dist ode | label alignment mIoU | s/image |")
    print("|---|---|---|---|---|---|")
    if alignment:
        print(f"| real val images (ceiling) | — | — | — | {alignment['real val images (ceiling)']:.3f} | — |")
    for key, (images, seconds) in results.items():
        sampler, steps, noise_seed, bf16 = key
        name = sampler + (", other step noise" if noise_seed != args.seed else "") + (", bf16" if bf16 else "")
        dist_ref = np.abs(images - reference).mean()
        dist_ode = np.abs(images - ode).mean()
        score = f"{alignment[key]:.3f}" if key in alignment else "—"
        print(f"| {name} | {steps or args.reference_steps} | {dist_ref:.2f} | {dist_ode:.2f} | {score} "
              f"| {seconds:.2f} |")


if __name__ == "__main__":
    main()

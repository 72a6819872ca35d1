"""The sampling stage behind `main.py sample`: checkpoint -> EMA model -> guided denoiser -> sampler -> files.

Masks come from the dataset split named by `mask_split` ("val" = the masks held out from training, recreated
with the training run's seed and val_fraction), taken in dataset order and cycled until `num_samples`. Image i
starts from noise of its own generator (seeded by `seed` and i), so it is the same whatever `batch_size`.
Outputs follow ISDM's layout: images/ labels/ colored_labels/ samples/ with the same stem, plus grid.png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import MODEL_KEYS, SampleConfig, parse_number_list, config_from_dict, config_to_dict
from .data import Pair, SegmentationDataset, index_dataset, one_hot, split_train_val
from .diffusion import GaussianDiffusion, make_betas
from .errors import ConfigError
from .guidance import conditional_denoiser
from .results import SampleWriter, new_run_dir, to_uint8_image, write_grid, write_json
from .samplers import PerImageNoise, image_seed, sample_ancestral, sample_ddim
from .train import build_model, select_device


@dataclass(frozen=True)
class TrainedWith:
    """What sampling needs to know about the training run behind a checkpoint."""

    diffusion_steps: int = 1000
    seed: int = 0
    val_fraction: float = 0.2


def sampling_diffusion(config: SampleConfig, trained: TrainedWith = TrainedWith()) -> GaussianDiffusion:
    """The process sampled: the model's own process respaced to `timestep_respacing` steps when given, else
    ISDM's rescaled schedule: a `diffusion_steps`-step linear/cosine schedule whose timesteps are rescaled
    into the model's 1000-step range."""
    if config.timestep_respacing:
        try:
            return GaussianDiffusion.create(trained.diffusion_steps, config.noise_schedule,
                                            config.timestep_respacing, learn_sigma=config.learn_sigma,
                                            rescale_timesteps=config.rescale_timesteps)
        except ValueError as e:
            raise ConfigError(f"key 'timestep_respacing' {config.timestep_respacing!r}: {e}") from None
    return GaussianDiffusion(make_betas(config.noise_schedule, config.diffusion_steps),
                             learn_sigma=config.learn_sigma, rescale_timesteps=config.rescale_timesteps)


def _normalized(key: str, value: Any) -> Any:
    """A model key's value in one form, so that "1,2,2" and [1, 2, 2] compare equal."""
    if key in ("channel_mult", "attention_resolutions") and value not in ("", None):
        return tuple(float(v) for v in parse_number_list(value, key, float))
    return value


def merge_checkpoint_config(config: SampleConfig, given: set[str], payload: dict,
                            source: str) -> tuple[SampleConfig, TrainedWith]:
    """Take the model's shape from the checkpoint; keys the user also gave must agree with it."""
    trained = payload.get("config")
    if not trained:  # a plain SDM/ISDM state dict: the sample config describes the model
        return config, TrainedWith(seed=config.seed, val_fraction=config.val_fraction)
    values = config_to_dict(config)
    for key in MODEL_KEYS + ("dataset_mode",):
        if key not in trained:
            continue
        if key in given and _normalized(key, values[key]) != _normalized(key, trained[key]):
            raise ConfigError(f"{source}: key '{key}' is {values[key]!r} but the checkpoint was trained with "
                              f"{trained[key]!r}; remove the key or use the matching checkpoint")
        values[key] = trained[key]
    merged, _ = config_from_dict("sample", values, source)
    return merged, TrainedWith(trained.get("diffusion_steps", 1000), trained.get("seed", config.seed),
                               trained.get("val_fraction", config.val_fraction))


def select_masks(config: SampleConfig, pairs_by_split: dict[str, list[Pair]]) -> list[Pair]:
    """The source pair of each of the num_samples images: the split's pairs in order, cycled."""
    pairs = pairs_by_split[config.mask_split]
    if not pairs:
        raise ConfigError(f"key 'mask_split' is {config.mask_split!r} but that split has no masks "
                          f"(the model was trained with val_fraction 0); choose 'train', 'test' or 'all'")
    return [pairs[i % len(pairs)] for i in range(config.num_samples)]


def load_sampling_model(config: SampleConfig, given: set[str], source: str, device: torch.device):
    path = ckpt.resolve_checkpoint(config.model_path, key="model_path", prefer="best")
    payload = ckpt.load_checkpoint(path)
    config, trained = merge_checkpoint_config(config, given, payload, source)
    if config.num_classes is None:
        raise ConfigError(f"{source}: key 'num_classes' is required: checkpoint {path} does not record it")
    model = build_model(config)
    weights = ckpt.extract_state_dict(payload, prefer_ema=config.use_ema)
    ckpt.load_weights(model, weights, path, f"the model described by {source}")
    return config, trained, model.to(device).eval(), path


def run_sampling(config: SampleConfig, given: set[str] = frozenset(), source: str = "config",
                 log=print) -> dict[str, Any]:
    """Sample into a fresh run folder under root_log_dir, made once the model and the masks are ready.

    `given` are the keys the user set explicitly: those must agree with the checkpoint's config."""
    device = select_device(config.device)
    config, trained, model, checkpoint_path = load_sampling_model(config, set(given), source, device)
    index = index_dataset(config.data_dir, config.dataset_mode, config.num_classes,
                          require_test=config.mask_split in ("test", "all"))
    train_pairs, val_pairs = split_train_val(index.train, trained.val_fraction, trained.seed)
    sources = select_masks(config, {"train": train_pairs, "val": val_pairs, "test": index.test,
                                    "all": index.train + index.test})
    unique = list(dict.fromkeys(sources))
    dataset = SegmentationDataset(unique, config.image_size, config.dataset_mode, config.resize_mode)
    position = {pair: i for i, pair in enumerate(unique)}

    diffusion = sampling_diffusion(config, trained)
    run_dir = new_run_dir(config.root_log_dir, "sample")
    log(f"run folder: {run_dir}")
    write_json(run_dir / "config.json", {**config_to_dict(config), "resolved_model_path": str(checkpoint_path)})
    sampler = "ddim" if config.use_ddim else "ancestral"
    log(f"sampling {config.num_samples} images from {checkpoint_path} with {diffusion.num_timesteps} {sampler} "
        f"steps, guidance s={config.s}, masks from split '{config.mask_split}' ({len(unique)} distinct)")
    writer = SampleWriter(run_dir, config.num_classes)
    autocast = config.use_fp16 and device.type == "cuda"
    grid_rows, started = [], time.perf_counter()
    bar = tqdm(total=config.num_samples * diffusion.num_timesteps, desc="sample", unit="step", dynamic_ncols=True,
               unit_scale=1.0 / max(1, config.num_samples))
    try:
        for start in range(0, config.num_samples, config.batch_size):
            ids = list(range(start, min(start + config.batch_size, config.num_samples)))
            items = [dataset[position[sources[i]]] for i in ids]
            masks = torch.stack([it["mask"] for it in items])
            labels = one_hot(masks, config.num_classes).to(device)
            noise = PerImageNoise([image_seed(config.seed, i) for i in ids],
                                  (3, config.image_size, config.image_size), device)
            x_T = noise()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                denoise = conditional_denoiser(model, labels, config.s)
                progress = lambda n, k=len(ids): bar.update(n * k)  # noqa: E731
                if config.use_ddim:
                    images = sample_ddim(diffusion, denoise, x_T, noise, config.ddim_eta, config.clip_denoised,
                                         progress)
                else:
                    images = sample_ancestral(diffusion, denoise, x_T, noise, config.clip_denoised, progress)
            for k, i in enumerate(ids):
                stem = f"{i:05d}_{sources[i].stem}"
                sample = to_uint8_image(images[k].float().cpu())
                real = to_uint8_image(items[k]["image"])
                mask = masks[k].numpy()
                writer.write(stem, sample, mask, real)
                if len(grid_rows) < 8:
                    grid_rows.append((mask, real, sample))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    write_grid(run_dir / "grid.png", grid_rows, config.num_classes)
    summary = {"num_samples": config.num_samples, "checkpoint": str(checkpoint_path), "sampler": sampler,
               "steps": diffusion.num_timesteps, "guidance_scale": config.s, "mask_split": config.mask_split,
               "seconds": round(seconds, 3), "seconds_per_image": round(seconds / config.num_samples, 4),
               "device": str(device)}
    write_json(run_dir / "summary.json", summary)
    log(f"wrote {config.num_samples} samples to {run_dir} ({summary['seconds_per_image']:.3f} s/image)")
    return {**summary, "run_dir": str(run_dir)}

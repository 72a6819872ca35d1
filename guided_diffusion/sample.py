"""The sampling stage behind `main.py sample`: checkpoint -> EMA model -> guided denoiser -> sampler -> files.

Masks come from the dataset split named by `mask_split` ("val" = the masks held out from training, recreated
with the training run's seed and val_fraction), taken in dataset order and cycled until `num_samples`, or, with
`balance_args`, chosen (and augmented) by balance.py so the classes end up balanced. Image i
starts from noise of its own generator (seeded by `seed` and i), so it is the same whatever `batch_size`.
`mode` variation / inpaint start from the mask's real image / paint defects onto backgrounds (see inpaint.py);
`mode` paste needs no model: it copies the masks' real defect pixels onto backgrounds (see paste.py).
Outputs follow ISDM's layout: images/ labels/ colored_labels/ samples/ with the same stem, plus grid.png.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .balance import ChosenMask, choose_masks
from .config import MODEL_KEYS, SampleConfig, parse_number_list, config_from_dict, config_to_dict
from .data import Pair, SegmentationDataset, index_dataset, one_hot, read_class_names, split_train_val
from .diffusion import GaussianDiffusion, make_betas, space_timesteps
from .distributed import current_world, gather_to_main, made_by_main
from .errors import ConfigError
from .guidance import conditional_denoiser
from .hardness import draw_by_hardness, measure_hardness, uses_of, write_selection_reports
from .inpaint import defect_candidates, plan_modes
from .results import SampleWriter, new_run_dir, to_uint8_image, write_grid, write_json, write_legend
from .samplers import PerImageNoise, image_seed, log_snr_timesteps, run_sampler
from .train import bf16_autocast, build_model, select_device


@dataclass(frozen=True)
class TrainedWith:
    """What sampling needs to know about the training run behind a checkpoint."""

    diffusion_steps: int = 1000
    seed: int = 0
    val_fraction: float = 0.2


DEFAULT_SOLVER_STEPS = 20
"""DPM-Solver++(2M)'s steps when `steps` is 0 (see the quality guard figures in the README)."""


def sampling_diffusion(config: SampleConfig, trained: TrainedWith = TrainedWith()) -> GaussianDiffusion:
    """The process sampled, one model evaluation per step:
    - `steps` > 0, or sampler dpm++2m: the model's own process at `steps` of its timesteps (even in log-SNR for
      dpm++2m, evenly strided for ancestral/ddim);
    - else `timestep_respacing` when given (guided-diffusion's respacing of the model's process);
    - else ISDM's rescaled schedule: a `diffusion_steps`-step linear/cosine schedule whose timesteps are
      rescaled into the model's 1000-step range."""
    model_process = GaussianDiffusion.create(trained.diffusion_steps, config.noise_schedule,
                                             learn_sigma=config.learn_sigma, rescale_timesteps=config.rescale_timesteps)
    if config.steps or config.sampler == "dpm++2m":
        steps = config.steps or DEFAULT_SOLVER_STEPS
        if steps > trained.diffusion_steps:
            raise ConfigError(f"key 'steps' is {steps} but the model was trained with {trained.diffusion_steps} "
                              f"diffusion steps; use at most that many")
        if config.sampler == "dpm++2m":
            return model_process.respaced(log_snr_timesteps(model_process, steps))
        return model_process.respaced(space_timesteps(trained.diffusion_steps, str(steps)))
    if config.timestep_respacing:
        try:
            return model_process.respaced(space_timesteps(trained.diffusion_steps, config.timestep_respacing))
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
        if config.image_channels == "auto":  # the weights say it: 3 for every ISDM/SDM model
            channels = ckpt.image_channels_of(ckpt.extract_state_dict(payload)) or 3
            config = dataclasses.replace(config, image_channels=channels)
        return config, TrainedWith(seed=config.seed, val_fraction=config.val_fraction)
    trained = {"image_channels": 3, **trained}  # a checkpoint that records none predates the key: ISDM's RGB
    values = config_to_dict(config)
    for key in MODEL_KEYS + ("dataset_mode",):
        if key not in trained:
            continue
        chosen = key in given and values[key] != "auto"  # image_channels "auto" means the checkpoint's
        if chosen and _normalized(key, values[key]) != _normalized(key, trained[key]):
            raise ConfigError(f"{source}: key '{key}' is {values[key]!r} but the checkpoint was trained with "
                              f"{trained[key]!r}; remove the key or use the matching checkpoint")
        values[key] = trained[key]
    merged, _ = config_from_dict("sample", values, source)
    return merged, TrainedWith(trained.get("diffusion_steps", 1000), trained.get("seed", config.seed),
                               trained.get("val_fraction", config.val_fraction))


def mask_splits(config: SampleConfig, trained: TrainedWith) -> tuple[dict[str, list[Pair]], list[Pair]]:
    """The pairs of each `mask_split` value (val recreated as in training; "all" = train/ and test/ when the
    dataset has a test/ folder), and the real set: train/'s pairs."""
    index = index_dataset(config.data_dir, config.dataset_mode, config.num_classes,
                          require_test=config.mask_split == "test")
    train_pairs, val_pairs = split_train_val(index.train, trained.val_fraction, trained.seed)
    return {"train": train_pairs, "val": val_pairs, "test": index.test, "all": index.train + index.test}, index.train


def select_masks(config: SampleConfig, pairs_by_split: dict[str, list[Pair]], real_pairs: list[Pair] = (),
                 log=print) -> tuple[list[ChosenMask], dict[str, Any] | None]:
    """The mask of each of the num_samples images, and with balance_args the report of the class shares.

    Without balance_args: the split's pairs in order, cycled (no report). With it: balance.choose_masks over the
    split's pairs, `real_pairs` being the real set the shares start from. With hardness_args the masks are
    drawn in proportion to hardness^exponent, or, with balance_args too, favoured by it within the balancing
    (hardness.py); the report then holds the hardness report under "hardness"."""
    pairs = pairs_by_split[config.mask_split]
    if not pairs:
        raise ConfigError(f"key 'mask_split' is {config.mask_split!r} but that split has no masks "
                          f"(the model was trained with val_fraction 0); choose 'train', 'test' or 'all'")
    hardness = None if config.hardness_args is None else measure_hardness(config, pairs, log)
    if config.balance_args is None:
        if hardness is not None:
            drawn = [pairs[i] for i in draw_by_hardness(hardness.weights, config.num_samples, config.seed)]
            report = hardness.report(uses_of(pairs, drawn)[0])
            return [ChosenMask(pair.stem, pair) for pair in drawn], {"hardness": report}
        cycled = [pairs[i % len(pairs)] for i in range(config.num_samples)]
        return [ChosenMask(pair.stem, pair) for pair in cycled], None
    chosen, report = choose_masks(config, pairs, list(real_pairs), log,
                                  None if hardness is None else hardness.weights)
    if hardness is not None:
        uses, augmented = uses_of(pairs, [c.pair for c in chosen])
        report["hardness"] = hardness.report(uses, augmented, with_balance=True)
    return chosen, report


def _mask_and_real(chosen: ChosenMask, dataset: SegmentationDataset,
                   position: dict[Pair, int]) -> tuple[torch.Tensor, np.ndarray | None]:
    """An image's mask (int64 class ids) and the real image it came from (uint8; None for an augmented mask)."""
    if chosen.mask is not None:
        return torch.from_numpy(chosen.mask.astype(np.int64)), None
    item = dataset[position[chosen.pair]]
    return item["mask"], to_uint8_image(item["image"], keep_gray=True)


def resolve_sampling_config(config: SampleConfig, given: set[str], source: str):
    """The checkpoint's path and payload, the config merged with its keys, and how it was trained."""
    path = ckpt.resolve_checkpoint(config.model_path, key="model_path", prefer="best")
    payload = ckpt.load_checkpoint(path)
    config, trained = merge_checkpoint_config(config, given, payload, source)
    if config.num_classes is None:
        raise ConfigError(f"{source}: key 'num_classes' is required: checkpoint {path} does not record it")
    return config, trained, path, payload


def preview_mask_selection(config: SampleConfig, given: set[str] = frozenset(), source: str = "config",
                           log=print) -> Path:
    """`main.py sample --dry-run` with balance_args or hardness_args: choose the masks and write the reports
    (balance.json/png, hardness.json/png, config.json) into a fresh sample run folder, without building the model
    or sampling."""
    if config.mode == "paste":  # no checkpoint: the config's own num_classes, seed and val_fraction
        from .paste import resolve_paste_config  # here: paste.py imports this module
        (config, trained), path = resolve_paste_config(config, log), None
    else:
        config, trained, path, _ = resolve_sampling_config(config, set(given), source)
    splits, real_pairs = mask_splits(config, trained)
    splits, _ = defect_candidates(config, splits)
    _, report = select_masks(config, splits, real_pairs, log)
    run_dir = new_run_dir(config.root_log_dir, "sample")
    resolved = {} if path is None else {"resolved_model_path": str(path)}
    write_json(run_dir / "config.json", {**config_to_dict(config), **resolved, "dry_run": True})
    if report is not None:
        write_selection_reports(run_dir, report)
    log(f"dry run: wrote the mask selection report to {run_dir}; nothing was sampled")
    return run_dir


def load_sampling_model(config: SampleConfig, given: set[str], source: str, device: torch.device):
    config, trained, path, payload = resolve_sampling_config(config, given, source)
    model = build_model(config)
    weights = ckpt.extract_state_dict(payload, prefer_ema=config.use_ema)
    ckpt.load_weights(model, weights, path, f"the model described by {source}")
    return config, trained, model.to(device).eval(), path


def run_sampling(config: SampleConfig, given: set[str] = frozenset(), source: str = "config",
                 log=print) -> dict[str, Any]:
    """Sample into a fresh run folder under root_log_dir, made once the model and the masks are ready.

    `given` are the keys the user set explicitly: those must agree with the checkpoint's config.
    With N processes, sampling batch k goes to rank k % N (so each image is computed in the same batch as by one
    process, and the files are the same); rank 0 makes the folder and writes config, grid and summary.
    Mode paste builds no model: paste.run_paste does the whole run."""
    if config.mode == "paste":
        from .paste import run_paste  # here: paste.py imports this module
        return run_paste(config, log)
    world = current_world()
    log = log if world.is_main else (lambda *_: None)
    device = select_device(config.device)
    config, trained, model, checkpoint_path = load_sampling_model(config, set(given), source, device)
    class_names = read_class_names(config.data_dir, config.num_classes)  # a bad classes.json fails before any work
    splits, real_pairs = mask_splits(config, trained)
    splits, without_defects = defect_candidates(config, splits)
    sources, balance_report = select_masks(config, splits, real_pairs, log)
    unique = list(dict.fromkeys(s.pair for s in sources if s.pair is not None))
    dataset = SegmentationDataset(unique, config.image_size, config.dataset_mode, config.resize_mode,
                                  image_channels=config.image_channels)
    position = {pair: i for i, pair in enumerate(unique)}

    diffusion = sampling_diffusion(config, trained)
    plan = plan_modes(config, diffusion, sources, real_pairs, without_defects, log)
    sources = plan.sources
    run_dir = made_by_main(lambda: new_run_dir(config.root_log_dir, "sample"))
    log(f"run folder: {run_dir}")
    if world.is_main:
        write_json(run_dir / "config.json", {**config_to_dict(config), "resolved_model_path": str(checkpoint_path)})
    if balance_report is not None and world.is_main:
        write_selection_reports(run_dir, balance_report)
    if plan.placements and world.is_main:
        write_json(run_dir / "inpaint.json", plan.listing())
    config = dataclasses.replace(config, num_samples=len(sources))  # the images made: skipped masks make none
    sampler = config.sampler
    log(f"sampling {config.num_samples} images from {checkpoint_path} with {diffusion.num_timesteps} {sampler} "
        f"steps, guidance s={config.s}, masks from split '{config.mask_split}' "
        f"({len({s.stem for s in sources})} distinct)")
    writer = SampleWriter(run_dir, config.num_classes)
    autocast = bf16_autocast(config.precision, device)
    grid_rows, started = [], time.perf_counter()
    batches = world.share(range(0, config.num_samples, config.batch_size))
    mine = sum(min(start + config.batch_size, config.num_samples) - start for start in batches)
    bar = tqdm(total=mine * plan.steps_run, desc="sample", unit="step", dynamic_ncols=True,
               unit_scale=1.0 / max(1, mine), disable=not world.is_main)
    try:
        for start in batches:
            ids = list(range(start, min(start + config.batch_size, config.num_samples)))
            items = [_mask_and_real(sources[i], dataset, position) for i in ids]
            noise = PerImageNoise([image_seed(config.seed, i) for i in ids],
                                  (config.image_channels, config.image_size, config.image_size), device)
            batch = plan.prepare(ids, items, noise, device)
            masks, x_T = batch.masks, batch.x
            labels = one_hot(masks, config.num_classes).to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                denoise = conditional_denoiser(model, labels, config.s)
                progress = lambda n, k=len(ids): bar.update(n * k)  # noqa: E731
                images = run_sampler(config.sampler, diffusion, denoise, x_T, noise,
                                     clip_denoised=config.clip_denoised, eta=config.ddim_eta, progress=progress,
                                     start_step=plan.start_step, hook=batch.hook,
                                     resample_steps=plan.resample_steps)
            for k, i in enumerate(ids):
                stem = f"{i:05d}_{sources[i].stem}"
                sample = batch.finish(k, to_uint8_image(images[k].float().cpu(), keep_gray=True))
                real = batch.shown[k]
                mask = masks[k].numpy()
                writer.write(stem, sample, mask, real)
                if i < 8:
                    grid_rows.append((i, (mask, real, sample)))
    finally:
        bar.close()
    grid_rows = [row for _, row in sorted(gather_to_main(grid_rows), key=lambda entry: entry[0])]  # waits for all
    seconds = time.perf_counter() - started
    if world.is_main:
        write_grid(run_dir / "grid.png", grid_rows, config.num_classes)
        write_legend(run_dir / "legend.png", class_names)
    summary = {"num_samples": config.num_samples, "checkpoint": str(checkpoint_path), "sampler": sampler,
               "steps": diffusion.num_timesteps, "guidance_scale": config.s, "mask_split": config.mask_split,
               "seconds": round(seconds, 3), "seconds_per_image": round(seconds / config.num_samples, 4),
               "device": str(device), **plan.summary()}
    if world.is_main:
        write_json(run_dir / "summary.json", summary)
    log(f"wrote {config.num_samples} samples to {run_dir} ({summary['seconds_per_image']:.3f} s/image)")
    return {**summary, "run_dir": str(run_dir)}

"""The sampling stage behind `main.py sample`: checkpoint -> EMA model -> guided denoiser -> sampler -> files.

Masks come from the dataset split named by `mask_split` ("val" = the masks held out from training, recreated
with the training run's seed and val_fraction), taken in dataset order and cycled until `num_samples`, or, with
`balance_args`, chosen (and augmented) by balance.py so the classes end up balanced, or, with `hardness_args`,
drawn by hardness (mask_selection.py). The hardness is measured by evaluation's scorer, which this package does
not import: the caller passes `measure_hardness` (main.py and the study pass evaluation.freemask's). With
`mask_source` the masks are new ones from a mask generator instead (masks/model.py; with `balance_args` chosen
among generated candidates), and masks_report.md compares them with the real train/ masks. Image i
starts from noise of its own generator (seeded by `seed` and i), so it is the same whatever `batch_size`.
`mode` variation / inpaint start from the mask's real image / paint defects onto backgrounds (see inpaint.py);
`mode` paste needs no model: it copies the masks' real defect pixels onto backgrounds (see paste.py).
Outputs follow ISDM's layout: images/ labels/ colored_labels/ samples/ with the same stem, plus grid.png
(generated masks have no real image: no images/ file). sampled.txt lists each image whose files are all written;
with `auto_resume` a run stopped before its end (no summary.json) is continued in its own folder: the images it
lists are kept, the rest sampled, and since image i depends only on `seed` and i the files match an unbroken run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..balance import ChosenMask
from ..config import MODEL_KEYS, SampleConfig, parse_number_list, config_from_dict, config_to_dict
from ..data import Pair, SegmentationDataset, one_hot, read_class_names
from ..diffusion import GaussianDiffusion, make_betas, space_timesteps
from ..distributed import StopSignals, any_rank, current_world, gather_to_main, made_by_main
from ..errors import ConfigError
from ..guidance import conditional_denoiser
from ..masks.model import generate_for_sampling
from ..masks.report import write_mask_report
from ..model_setup import bf16_autocast, build_model, select_device
from ..run_folder import (RUN_LOCK, SampleWriter, as_written, hold_run, new_run_dir, run_dirs_newest_first,
                          to_uint8_image, write_grid, write_json, write_legend)
from ..samplers import PerImageNoise, image_seed, log_snr_timesteps, run_sampler
from .hardness import MeasureHardness, write_selection_reports
from .inpaint import Batch, ModePlan, defect_candidates, plan_modes
from .mask_selection import TrainedWith, mask_splits, select_masks
from .paste import resolve_paste_config, run_paste


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
    if "ignore_index" not in given:  # the void value the model was trained with (none for older checkpoints)
        values["ignore_index"] = trained.get("ignore_index")
    merged, _ = config_from_dict("sample", values, source)
    return merged, TrainedWith(trained.get("diffusion_steps", 1000), trained.get("seed", config.seed),
                               trained.get("val_fraction", config.val_fraction))


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


class MaskSources(NamedTuple):
    """The mask of each image a run makes, how they were chosen, and the real set (train/'s pairs)."""

    sources: list[ChosenMask]
    selection_report: dict[str, Any] | None  # balance.json / hardness.json
    masks_report: dict[str, Any] | None  # masks_report.json of generated masks (mask_source)
    real_pairs: list[Pair]
    without_defects: int  # split masks defect_candidates left out (inpaint)


def choose_sources(config: SampleConfig, trained: TrainedWith, device: torch.device | str, log=print,
                   measure_hardness: MeasureHardness | None = None) -> MaskSources:
    """Dataset masks (mask_split, balance_args, hardness_args: mask_selection.py), or with mask_source new masks
    from a mask generator (masks.model.generate_for_sampling), with the reports of their choice."""
    splits, real_pairs = mask_splits(config, trained)
    if config.mask_source:
        names = read_class_names(config.data_dir, config.num_classes)
        generated = generate_for_sampling(config, real_pairs, device, names, log)
        return MaskSources(generated.sources, generated.selection_report, generated.quality_report, real_pairs, 0)
    splits, without_defects = defect_candidates(config, splits)
    sources, report = select_masks(config, splits, real_pairs, log, measure_hardness)
    return MaskSources(sources, report, None, real_pairs, without_defects)


def preview_mask_selection(config: SampleConfig, given: set[str] = frozenset(), source: str = "config",
                           log=print, measure_hardness: MeasureHardness | None = None) -> Path:
    """`main.py sample --dry-run` with balance_args or hardness_args: choose the masks and write the reports
    (balance.json/png, hardness.json/png, config.json) into a fresh sample run folder, without building the model
    or sampling. `measure_hardness`: see hardness.py (required with hardness_args)."""
    if config.mode == "paste":  # no checkpoint: the config's own num_classes, seed and val_fraction
        (config, trained), path = resolve_paste_config(config, log), None
    else:
        config, trained, path, _ = resolve_sampling_config(config, set(given), source)
    chosen = choose_sources(config, trained, select_device(config.device), log, measure_hardness)
    run_dir = new_run_dir(config.root_log_dir, "sample")
    resolved = {} if path is None else {"resolved_model_path": str(path)}
    write_json(run_dir / "config.json", {**config_to_dict(config), **resolved, "dry_run": True})
    if chosen.selection_report is not None:
        write_selection_reports(run_dir, chosen.selection_report)
    if chosen.masks_report is not None:
        write_mask_report(run_dir, chosen.masks_report)
    log(f"dry run: wrote the mask selection report to {run_dir}; nothing was sampled")
    return run_dir


def load_sampling_model(config: SampleConfig, given: set[str], source: str, device: torch.device):
    config, trained, path, payload = resolve_sampling_config(config, given, source)
    model = build_model(config)
    weights = ckpt.extract_state_dict(payload, prefer_ema=config.use_ema)
    ckpt.load_weights(model, weights, path, f"the model described by {source}")
    return config, trained, model.to(device).eval(), path


@dataclass(frozen=True)
class SamplingJob:
    """Everything a sampling run builds before its first batch (and before its run folder)."""

    config: SampleConfig  # merged with the checkpoint's keys; num_samples as asked (config.json records it)
    device: torch.device
    autocast: bool
    model: torch.nn.Module
    checkpoint_path: Path
    class_names: list[str]
    diffusion: GaussianDiffusion
    plan: ModePlan  # plan.sources: the mask of each image made (masks the mode skips make none)
    dataset: SegmentationDataset  # the real images and masks of plan's sources
    position: dict[Pair, int]  # a pair's index in `dataset`
    selection_report: dict[str, Any] | None
    masks_report: dict[str, Any] | None = None  # generated masks (mask_source): masks_report.md/json/png

    @property
    def num_images(self) -> int:
        return len(self.plan.sources)


def prepare_sampling(config: SampleConfig, given: set[str], source: str, log=print,
                     measure_hardness: MeasureHardness | None = None) -> SamplingJob:
    """Load the model and choose the masks and the mode's plan: every check of the user's input, no file written."""
    device = select_device(config.device)
    config, trained, model, checkpoint_path = load_sampling_model(config, given, source, device)
    class_names = read_class_names(config.data_dir, config.num_classes)  # a bad classes.json fails before any work
    sources, selection_report, masks_report, real_pairs, without_defects = choose_sources(
        config, trained, device, log, measure_hardness)
    unique = list(dict.fromkeys(s.pair for s in sources if s.pair is not None))
    dataset = SegmentationDataset(unique, config.image_size, config.dataset_mode, config.resize_mode,
                                  image_channels=config.image_channels)
    diffusion = sampling_diffusion(config, trained)
    plan = plan_modes(config, diffusion, sources, real_pairs, without_defects, log)
    return SamplingJob(config, device, bf16_autocast(config.precision, device), model, checkpoint_path, class_names,
                       diffusion, plan, dataset, {pair: i for i, pair in enumerate(unique)}, selection_report,
                       masks_report)


def run_sampling(config: SampleConfig, given: set[str] = frozenset(), source: str = "config",
                 log=print, measure_hardness: MeasureHardness | None = None) -> dict[str, Any]:
    """Sample into a fresh run folder under root_log_dir, made once the model and the masks are ready.

    `given` are the keys the user set explicitly: those must agree with the checkpoint's config.
    With N processes, sampling batch k goes to rank k % N (so each image is computed in the same batch as by one
    process, and the files are the same); rank 0 makes the folder and writes config, grid and summary.
    SIGTERM or SIGUSR1 (Slurm's preemption or time limit) stop it after the batch under way: the result then has
    `stop_signal` and no summary.json is written; `auto_resume` continues the run.
    Mode paste builds no model: paste.run_paste does the whole run. `measure_hardness` measures the masks'
    hardness with hardness_args (see hardness.py; evaluation.freemask.measure_hardness)."""
    if config.mode == "paste":
        return run_paste(config, log, measure_hardness)
    world = current_world()
    log = log if world.is_main else (lambda *_: None)
    job = prepare_sampling(config, set(given), source, log, measure_hardness)
    with ExitStack() as held:  # rank 0 holds the run folder until the run ends
        run_dir = made_by_main(lambda: sampling_run_dir(job, held, log))
        return sample_into(job, run_dir, log)


def sample_into(job: SamplingJob, run_dir: Path, log=print) -> dict[str, Any]:
    """run_sampling in its run folder `run_dir`: the images not yet in its sampled.txt, then grid and summary."""
    world = current_world()
    log(f"run folder: {run_dir}")
    record = SampledRecord(run_dir)
    kept = len(record.done & set(range(job.num_images)))
    if world.is_main and not record.done:
        write_start_files(job, run_dir)
    config = job.config
    masks_from = f"masks from {config.mask_source}" if config.mask_source else f"masks from split '{config.mask_split}'"
    resumed = f" ({kept} kept from the stopped run, {job.num_images - kept} to go)" if kept else ""
    log(f"sampling {job.num_images} images{resumed} from {job.checkpoint_path} with {job.diffusion.num_timesteps} "
        f"{config.sampler} steps, guidance s={config.s}{interval_text(config)}, {masks_from} "
        f"({len({s.stem for s in job.plan.sources})} distinct)")
    started = time.perf_counter()
    with StopSignals() as signals:
        grid_rows, stopped_by = sample_my_batches(job, SampleWriter(run_dir, config.num_classes, config.ignore_index),
                                                  record, signals)
    grid_rows = [row for _, row in sorted(gather_to_main(grid_rows), key=lambda entry: entry[0])]  # waits for all
    if any_rank(stopped_by is not None, job.device):  # every rank returns the stop, so that all exit with 75
        stopped_by = stopped_by or signals.received or "a stop signal on another rank"
        log(f"stopped by {stopped_by} with {len(SampledRecord(run_dir).done)} of {job.num_images} images written "
            f"to {run_dir}: rerun with auto_resume to continue it")
        return {"stop_signal": stopped_by, "run_dir": str(run_dir)}
    summary = sampling_summary(job, time.perf_counter() - started, kept)
    if world.is_main:
        write_grid(run_dir / "grid.png", grid_rows, config.num_classes, ignore_index=config.ignore_index)
        write_legend(run_dir / "legend.png", job.class_names)
        write_json(run_dir / "summary.json", summary)
    seconds = summary["seconds_per_image"]
    pace = "none sampled anew" if seconds is None else f"{seconds:.3f} s/image"
    log(f"wrote {job.num_images} samples to {run_dir} ({pace})")
    return {**summary, "run_dir": str(run_dir)}


def interval_text(config: SampleConfig) -> str:
    """' at t/T in [0.1, 0.6]' for the log line when guidance is limited to an interval, else ''."""
    if config.guidance_interval is None or config.s <= 1.0:
        return ""
    low, high = config.guidance_interval
    return f" at t/T in [{low:g}, {high:g}]"


class SampledRecord:
    """sampled.txt in a sample run folder: the index of each image whose files are all written, one line each,
    appended as the image is finished (by every process of a run). What `auto_resume` keeps of a stopped run."""

    NAME = "sampled.txt"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.NAME
        text = self.path.read_text() if self.path.exists() else ""
        # only whole lines: a stop while a line was written leaves a last line without its newline
        self.done = {int(line) for line in text.split("\n")[:-1] if line.strip().isdigit()}

    def add(self, index: int) -> None:
        with open(self.path, "a") as handle:  # one short append per image: whole, even beside other processes
            handle.write(f"{index}\n")
        self.done.add(index)


def start_config(job: SamplingJob) -> dict[str, Any]:
    """config.json of the run: the merged config and the checkpoint it resolved to."""
    return {**config_to_dict(job.config), "resolved_model_path": str(job.checkpoint_path)}


def resume_refusal(job: SamplingJob, run_dir: Path) -> str | None:
    """Why the stopped run `run_dir` cannot be continued by `job`, or None when it can."""
    if (run_dir / "summary.json").exists():
        return "it is finished (summary.json)"
    try:
        written = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "it has no readable config.json"
    ours = as_written(start_config(job))
    differing = sorted(key for key in ours.keys() | written.keys() if ours.get(key) != written.get(key))
    return f"its config.json differs in {', '.join(differing)}" if differing else None


def sampling_run_dir(job: SamplingJob, held: ExitStack, log=print) -> Path:
    """The run folder, held (`hold_run`) until `held` closes: a fresh `sample_NNN` under root_log_dir, or with
    `auto_resume` the newest one there that no other process is sampling into, when it stopped before its end and
    was made by the same config (the log says why another is not continued)."""
    root = job.config.root_log_dir
    for run_dir in run_dirs_newest_first(root, "sample") if job.config.auto_resume else []:
        refusal = resume_refusal(job, run_dir)
        if refusal is not None:
            log(f"auto_resume: not continuing {run_dir}: {refusal}; starting a new run folder")
            break
        lock = hold_run(run_dir)
        if lock is None:
            log(f"auto_resume: not continuing {run_dir}: another process is sampling into it (it holds "
                f"{run_dir / RUN_LOCK})")
            continue
        held.enter_context(lock)
        log(f"auto_resume: continuing {run_dir}")
        return run_dir
    run_dir = new_run_dir(root, "sample")
    lock = hold_run(run_dir)
    if lock is not None:  # None only if another process looked in at the same moment: go on without
        held.enter_context(lock)
    return run_dir


def write_start_files(job: SamplingJob, run_dir: Path) -> None:
    """Rank 0, before sampling: config.json, the mask selection reports, inpaint.json."""
    write_json(run_dir / "config.json", start_config(job))
    if job.selection_report is not None:
        write_selection_reports(run_dir, job.selection_report)
    if job.masks_report is not None:
        write_mask_report(run_dir, job.masks_report)
    if job.plan.placements:
        write_json(run_dir / "inpaint.json", job.plan.listing())


def sample_my_batches(job: SamplingJob, writer: SampleWriter, record: SampledRecord,
                      signals: StopSignals | None = None) -> tuple[list[tuple[int, tuple]], str | None]:
    """Sample and write this rank's batches, but for those whose images `record` has all, and none after a stop
    signal. Returns the grid rows of its images among the first 8, by image index (read back from the files for a
    batch not sampled again), and the signal that left batches unsampled (None when all are done).

    The bar counts whole steps: a batch's sampler step is one, so it ends at batches to sample x steps; images
    done are shown beside it."""
    config, world = job.config, current_world()
    batches = [list(range(start, min(start + config.batch_size, job.num_images)))
               for start in world.share(range(0, job.num_images, config.batch_size))]
    pending = [ids for ids in batches if not record.done.issuperset(ids)]
    bar = tqdm(total=len(pending) * job.plan.steps_run, desc="sample", unit="step", dynamic_ncols=True,
               disable=world.bar_disabled)
    mine = sum(len(ids) for ids in batches)
    grid_rows, done = [], mine - sum(len(ids) for ids in pending)
    try:
        for ids in batches:
            if ids not in pending:
                grid_rows += [(i, writer.read(image_stem(job, i))) for i in ids if i < 8]
                continue
            if signals is not None and signals.received:
                return grid_rows, signals.received
            images, batch = sample_batch(job, ids, bar.update)
            grid_rows += write_batch(job, ids, images, batch, writer, record)
            done += len(ids)
            bar.set_postfix(images=f"{done}/{mine}")
    finally:
        bar.close()
    return grid_rows, None


def sample_batch(job: SamplingJob, ids: list[int], progress) -> tuple[torch.Tensor, Batch]:
    """The images `ids` (indices into the plan's sources), sampled together; `progress(1)` after each step."""
    config, device = job.config, job.device
    items = [_mask_and_real(job.plan.sources[i], job.dataset, job.position) for i in ids]
    noise = PerImageNoise([image_seed(config.seed, i) for i in ids],
                          (config.image_channels, config.image_size, config.image_size), device)
    batch = job.plan.prepare(ids, items, noise, device)
    labels = one_hot(batch.masks, config.num_classes, config.ignore_index).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.autocast):
        denoise = sampling_denoiser(config, job.model, labels, job.diffusion)
        images = run_sampler(config.sampler, job.diffusion, denoise, batch.x, noise,
                             clip_denoised=config.clip_denoised, eta=config.ddim_eta, progress=progress,
                             start_step=job.plan.start_step, hook=batch.hook, resample_steps=job.plan.resample_steps)
    return images, batch


def sampling_denoiser(config: SampleConfig, model: torch.nn.Module, labels: torch.Tensor,
                      diffusion: GaussianDiffusion):
    """The model conditioned on `labels` with the config's guidance: scale `s`, only inside `guidance_interval`
    (fractions of `diffusion`'s model time) when one is given. Every mode's sampling (noise, variation, inpaint)
    evaluates the model through it. Only the eps channels are guided, never the learned variance (a grey model
    has 1 + 1 output channels)."""
    return conditional_denoiser(model, labels, config.s,
                                guidance_interval=config.guidance_interval, time_range=diffusion.model_time_range)


def image_stem(job: SamplingJob, index: int) -> str:
    """The file stem of image `index`: its number and its mask's stem."""
    return f"{index:05d}_{job.plan.sources[index].stem}"


def write_batch(job: SamplingJob, ids: list[int], images: torch.Tensor, batch: Batch, writer: SampleWriter,
                record: SampledRecord) -> list[tuple[int, tuple]]:
    """Write the batch's images, labels and real images but those `record` has (the leftovers of an image a stop
    cut short are replaced), recording each; the grid rows (index, (mask, real, sample)) of the first 8 images."""
    grid_rows = []
    for k, i in enumerate(ids):
        sample = batch.finish(k, to_uint8_image(images[k].float().cpu(), keep_gray=True))
        real, mask = batch.shown[k], batch.masks[k].numpy()
        if i not in record.done:
            writer.discard(image_stem(job, i))
            writer.write(image_stem(job, i), sample, mask, real)
            record.add(i)
        if i < 8:
            grid_rows.append((i, (mask, real, sample)))
    return grid_rows


def sampling_summary(job: SamplingJob, seconds: float, kept: int = 0) -> dict[str, Any]:
    """summary.json: what was sampled, how, and how long it took (`seconds` for the images sampled by this run:
    all but the `kept` ones of a stopped run it continued)."""
    config = job.config
    sampled = job.num_images - kept
    return {"num_samples": job.num_images, "checkpoint": str(job.checkpoint_path), "sampler": config.sampler,
            "steps": job.diffusion.num_timesteps, "guidance_scale": config.s, "mask_split": config.mask_split,
            **({"guidance_interval": config.guidance_interval} if config.guidance_interval is not None else {}),
            **({"mask_source": config.mask_source} if config.mask_source else {}),
            "seconds": round(seconds, 3), "seconds_per_image": round(seconds / sampled, 4) if sampled else None,
            **({"kept_from_stopped_run": kept} if kept else {}),
            "device": str(job.device), **job.plan.summary()}

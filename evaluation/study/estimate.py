"""How long a study will take on this machine: `evaluation/experiment.sh -c <config> --estimate`.

The same config can take 2 hours on one 2-core CPU and 8 on another (bf16 autocast or not, AVX-512 or not), so a
wall time measured elsewhere says little. The estimate times the study's own models here, for a few steps each:

- each SDM's training step at its batch and crop (train and finetune), and its forward pass at the image size
  with as many images as the sampler sends per call (its batch, doubled where classifier-free guidance runs);
- each mask generator's training step and forward pass, the same way;
- the segmenter's training step at the protocol's batch, and its prediction per image;

and multiplies them by the work of each unit the study runs (plan.plan_units, the list the study's progress
lines count too): steps, sampled images x sampler steps x forwards per step (2 where classifier-free guidance
runs), segmenters x (steps + validation checks + the test split), label alignment, FreeMask's scorer. Nothing
is written into the study folder. What it leaves out (data loading, checkpoints, plots, patience stopping a run
early) is small on the measured configs, and it says so.

With `--jobs N` the models are timed with the threads a job gets, and the units, each with the seconds a unit's
process takes to start (timed once), are laid out N at a time as `--jobs` starts them (jobs.laid_out).

`plan_study` does the counting with any `Timings`, so the arithmetic is tested without timing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from guided_diffusion.config import config_from_dict
from guided_diffusion.data import one_hot
from guided_diffusion.masks.train import MaskTrainer
from guided_diffusion.model_setup import bf16_autocast, cpu_bf16_support, select_device
from guided_diffusion.train import Trainer

from ..image_sets import link_subset
from ..segmenter.model import SegmenterSpec, TrainSettings, build_segmenter, predict, train_segmenter
from .config import StudyConfig
from .plan import plan_units
from .progress import format_duration
from .jobs import laid_out, start_seconds, threads_per_job
from .units import Part, Rate, SplitSizes


@dataclass(frozen=True)
class ModelCosts:
    """Training seconds on this machine of one diffusion model (an SDM or a mask generator)."""

    train_step: float  # one optimiser step at the train config's batch (and crop)
    finetune_step: float  # the same at the finetune config's (0 when there is none)


@dataclass(frozen=True)
class SegmenterCosts:
    train_step: float  # one optimiser step at the protocol's batch and the study's image size
    predict_image: float  # one image segmented (validation checks, test, label alignment, filtering)


class Timings(Protocol):
    """Where the per-step seconds come from: `MeasuredTimings` times the study's models on this machine."""

    def sdm(self, values: dict[str, Any]) -> ModelCosts: ...

    def masks(self, values: dict[str, Any]) -> ModelCosts: ...

    def forward(self, action: str, values: dict[str, Any], rows: int) -> float:
        """Seconds of one no-gradient forward call of `rows` images through the model of `action` ("train": an
        SDM, "masks": a mask generator) built from `values`, at its image size. It is timed at the rows the
        sampler sends, because the seconds per image depend on them (the study's 128 px SDM on 2 AVX2 cores: 0.59
        s an image at 8 rows and 0.77 at 32 in one session)."""
        ...

    def segmenter(self) -> SegmenterCosts: ...


@dataclass(frozen=True)
class Stage:
    """A row of the estimate: `runs` runs of `work`, each taking `seconds` here."""

    name: str
    runs: int
    work: str
    seconds: float

    @property
    def total(self) -> float:
        return self.runs * self.seconds


def _key(*parts: Any) -> str:
    """A cache key of JSON-able settings."""
    return json.dumps(parts, sort_keys=True, default=str)


def rate_seconds(rate: Rate, timings: Timings) -> float:
    """Seconds of one count of `rate` (a step, a forward call, a predicted image) on `timings`."""
    if rate.model == "segmenter":
        costs = timings.segmenter()
        return costs.train_step if rate.what == "train_step" else costs.predict_image
    action = "masks" if rate.model == "masks" else "train"
    if rate.what == "forward":
        return timings.forward(action, rate.values, rate.rows)
    model = timings.masks(rate.values) if rate.model == "masks" else timings.sdm(rate.values)
    return model.finetune_step if rate.what == "finetune_step" else model.train_step


def part_seconds(part: Part, timings: Timings) -> float:
    return sum(term.count * rate_seconds(term.rate, timings) for term in part.terms)


def plan_study(config: StudyConfig, num_classes: int, sizes: SplitSizes, timings: Timings) -> list[Stage]:
    """The study's work as stages with their seconds on `timings`: the units of plan.plan_units (what the
    study runs), in the order the study runs them, those doing the same work (a stage) on one row."""
    stages: dict[str, Stage] = {}
    for unit in plan_units(config, num_classes, sizes):
        for part in unit.parts:
            if part.stage in stages:
                stages[part.stage] = dataclasses.replace(stages[part.stage], runs=stages[part.stage].runs + 1)
            else:
                stages[part.stage] = Stage(part.stage, 1, part.work, part_seconds(part, timings))
    return list(stages.values())


def jobs_wall_time(config: StudyConfig, num_classes: int, sizes: SplitSizes, timings: Timings, jobs: int,
                   start: float = 0.0) -> float:
    """The study's wall time run `jobs` units at a time (`--jobs`), each unit taking its seconds on `timings`
    plus `start`, the seconds its process takes to start."""
    units = plan_units(config, num_classes, sizes)
    seconds = {unit.id: start + sum(part_seconds(part, timings) for part in unit.parts) for unit in units}
    return laid_out(units, seconds, jobs)


# -------------------------------------------------------------------------------------------------------------
# timing on this machine


def seconds_per_call(work: Callable[[], Any], budget: float = 2.0, most: int = 5, warm_up: bool = True,
                     least: int = 1) -> float:
    """The median seconds of `work`: calls until `budget` seconds are spent (at least `least`, at most `most`), after
    one untimed warm-up call (`warm_up`), or timing the first call too, so that a call longer than the budget runs
    once (a forward pass: its first call costs no more than the next, 25.6 s against 25.8 and 27.9 s for the
    study's 128 px SDM at 32 rows on 2 cores; a training step's first call does, 4.3-4.8 s against 3.7)."""
    if warm_up:
        work()
    times: list[float] = []
    while len(times) < least or (len(times) < most and sum(times) < budget):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class MeasuredTimings:
    """Times the study's models on this machine, each distinct setting once. Trainers are built on `data_dir` (a
    folder of links to a subset) and make their run folders in `scratch`, which the caller removes."""

    def __init__(self, config: StudyConfig, num_classes: int, device: torch.device, bf16: bool, data_dir: Path,
                 scratch: Path, log: Callable[[str], None] = print):
        self.config, self.num_classes, self.device, self.bf16, self.log = config, num_classes, device, bf16, log
        self.data_dir, self.scratch = data_dir, scratch
        self.cache: dict[str, Any] = {}
        self.trainers: dict[str, Any] = {}

    def _trainer(self, action: str, values: dict[str, Any]):
        """The trainer of `values` (built once: the forward timings reuse the training timings' model)."""
        key = _key(action, values)
        if key not in self.trainers:
            config, _ = config_from_dict(action, {**values, "data_dir": str(self.data_dir), "auto_resume": False,
                                                  "root_log_dir": tempfile.mkdtemp(dir=self.scratch)},
                                         f"study {action}")
            self.trainers[key] = (MaskTrainer if action == "masks" else Trainer)(config, action, lambda *_: None)
        return self.trainers[key]

    def _costs(self, action: str, values: dict[str, Any], finetune: dict[str, Any] | None) -> ModelCosts:
        trainer = self._trainer(action, values)
        # at least 3 steps: one step of the study's SDM took 3.4-4.0 s on 2 cores, and it is multiplied by 1,500
        step = seconds_per_call(lambda: _train_step(trainer), least=3)
        tune = step
        if finetune is not None and any(finetune.get(k) != values.get(k) for k in ("batch_size", "crop_size")):
            tuning = self._trainer("train", finetune)  # the same network and step at the finetune batch and crop
            tune = seconds_per_call(lambda: _train_step(tuning), least=3)
        return ModelCosts(step, tune)

    def sdm(self, values: dict[str, Any]) -> ModelCosts:
        key = _key("sdm", values)
        if key not in self.cache:
            self.log(f"timing an SDM's training step here (batch {values.get('batch_size', 'default')}"
                     f"{', crop ' + str(values['crop_size']) if values.get('crop_size') else ''})")
            self.cache[key] = self._costs("train", values, self._finetune_of(values))
        return self.cache[key]

    def _finetune_of(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """The train values of the finetuning that goes with the SDM of train `values` (None: no finetuning)."""
        for name, generator in self.config.generators.items():
            if generator.kind != "sdm" or generator.labels == "filtered":
                continue
            settings = self.config.sdm_settings(name)
            if settings.get("finetune") is None:
                continue
            if all(values.get(k) == v for k, v in {**settings.get("model", {}), **settings["train"]}.items()):
                keys = {k: v for k, v in settings["finetune"].items() if k in ("batch_size", "crop_size")}
                return {**values, **keys}
        return None

    def masks(self, values: dict[str, Any]) -> ModelCosts:
        key = _key("masks", values)
        if key not in self.cache:
            self.log("timing a mask generator's training step here")
            self.cache[key] = self._costs("masks", values, None)
        return self.cache[key]

    def forward(self, action: str, values: dict[str, Any], rows: int) -> float:
        trainer = self._trainer(action, values)
        config = trainer.config
        # what the forward's time depends on: the network, its precision and device, and the rows; not the
        # training keys, so the levers of one network share one timing
        key = _key("forward", action, config.model_keys(), trainer.autocast, str(trainer.device), rows)
        if key not in self.cache:
            model = "a mask generator" if action == "masks" else "an SDM"
            self.log(f"timing {model}'s forward pass of {rows} images at {config.image_size} px here")
            self.cache[key] = seconds_per_call(lambda: _forward(trainer, rows), warm_up=False)
        return self.cache[key]

    def segmenter(self) -> SegmenterCosts:
        if "segmenter" not in self.cache:
            self.log("timing a segmenter's training step and prediction here")
            self.cache["segmenter"] = _segmenter_costs(self.config, self.num_classes, self.device, self.bf16)
        return self.cache["segmenter"]


def _train_step(trainer) -> None:
    size = trainer.config.batch_size
    items = [trainer.dataset[i % len(trainer.dataset)] for i in range(size)]
    trainer.train_step(torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]))


@torch.no_grad()
def _forward(trainer, rows: int) -> None:
    item = trainer.dataset[0]
    x = torch.randn(rows, *item["image"].shape, device=trainer.device)
    labels = one_hot(item["mask"][None].expand(rows, -1, -1), trainer.config.num_classes,
                     trainer.config.ignore_index).to(trainer.device)
    t = torch.full((rows,), 500, device=trainer.device)
    trainer.model.eval()
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
        trainer.forward(x, t, labels)


def _segmenter_costs(config: StudyConfig, num_classes: int, device: torch.device, bf16: bool
                     ) -> SegmenterCosts:
    protocol, size = config.segmenter, config.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (protocol.batch_size * 2, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, num_classes, (protocol.batch_size * 2, size, size)).astype(np.uint8)
    spec = SegmenterSpec(protocol.architecture, num_classes, protocol.encoder)

    # the seconds between steps, stamped by the validation hook called after each: their median over the 10 steps
    # after the first, without the model's build (the difference of two whole runs counted its variable time
    # twice). Runs still differ by the machine's own spread: 0.61-0.74 s a step on 2 cores, where the study's
    # segmenter ran at 0.73 over 300 steps.
    stamps: list[float] = []

    def stamp(_model) -> float:
        stamps.append(time.perf_counter())
        return 0.0

    settings = TrainSettings(11, protocol.batch_size, protocol.lr, protocol.weight_decay, "flip", 0, None, bf16, 1)
    train_segmenter(images, masks, spec, settings, device, progress=False, validate=stamp)
    step = float(statistics.median(np.diff(stamps)))
    model = build_segmenter(spec).to(device).eval()
    predicting = seconds_per_call(lambda: predict(model, images, device, bf16=bf16)) / len(images)
    return SegmenterCosts(step, predicting)


def format_estimate(stages: list[Stage], machine: str, extra: list[str] | None = None) -> str:
    lines = [f"estimated wall time on this machine ({machine}):", "",
             "| stage | runs | work per run | per run | total |", "|---|---|---|---|---|"]
    for stage in stages:
        lines.append(f"| {stage.name} | {stage.runs} | {stage.work} | {format_duration(stage.seconds)} | "
                     f"{format_duration(stage.total)} |")
    total = sum(stage.total for stage in stages)
    lines += [f"| **total** | | | | **{format_duration(total)}** |", *(["", *extra] if extra else []), "",
              "From a few timed steps of each model here, times the work the config asks for. Not counted: "
              "data loading, checkpoints, reports and plots (a few minutes), masks drawn again (`mask_retries`), "
              "nor a run that patience stops early. "
              "A resumed study skips the units already in its ledger."]
    return "\n".join(lines)


def jobs_lines(jobs: int, threads: int, lanes: int, wall: float, total: float, start: float) -> list[str]:
    """What `--jobs` makes of the table: `lanes` units at a time, each a process of `threads` threads that takes
    `start` seconds to start."""
    each = f"{threads} CPU thread{'s' if threads > 1 else ''}"
    lines = [f"**with --jobs {jobs}: about {format_duration(wall)}**, the units above (each a process of {each}, "
             f"as timed, which takes {start:.0f} s here to import the study before its work) laid out {lanes} at a "
             f"time as --jobs starts them: in plan order, each once the units it needs are done "
             f"({format_duration(total)} one after another in one process). Not counted: the jobs slowing each "
             "other as they share the memory (two 1-thread segmenter trainings side by side each ran up to 17 % "
             "slower than one alone on a 2-core AMD EPYC, 2026-12-07)."]
    if lanes < jobs:
        lines.append(f"--jobs {jobs} is more jobs than the {lanes} threads here: they share the cores, so the "
                     f"layout counts {lanes} at a time.")
    return lines


def machine_text(device: torch.device, bf16: bool) -> str:
    """'cpu, 2 threads, fp32 (CPU bf16: none)' or 'cuda NVIDIA H200, bf16 autocast' (the segmenters'
    precision; each SDM's follows its own `precision` key, auto by default, and is timed as it will run)."""
    precision = "bf16 autocast" if bf16 else "fp32"
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}, {precision}"
    threads = torch.get_num_threads()
    return f"{device.type}, {threads} thread{'s' if threads > 1 else ''}, {precision} (CPU bf16: {cpu_bf16_support()})"


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's CPU threads set to `count` inside, as they were after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def estimate_study(config: StudyConfig, num_classes: int, split, log: Callable[[str], None] = print,
                   jobs: int = 1) -> str:
    """The estimate's table for `config` on this machine, with the study's `split` (study.make_split). Writes
    nothing into the study folder: the timed trainers work on links to the smallest subset in a temporary
    folder, removed at the end. With `jobs` > 1 on a CPU (`--jobs`), the models are timed with the threads a job
    gets, and a line lays the units out `jobs` at a time; on a GPU the jobs would share it, which the estimate
    cannot time, and it says so."""
    device = select_device(config.device)
    bf16 = bf16_autocast(config.segmenter.precision, device)
    sizes = SplitSizes.of(split)
    threads = torch.get_num_threads()
    per_job = threads_per_job(jobs, threads) if device.type == "cpu" else threads
    with torch_threads(per_job), tempfile.TemporaryDirectory(prefix="study-estimate-") as scratch:
        data_dir = link_subset(split.subsets[min(split.subsets)], Path(scratch) / "data", config.data_dir)
        timings = MeasuredTimings(config, num_classes, device, bf16, data_dir, Path(scratch), log)
        stages = plan_study(config, num_classes, sizes, timings)
        machine = machine_text(device, bf16)
        extra = None
        if jobs > 1 and device.type != "cpu":
            extra = [f"--jobs {jobs}: its units would share this {device.type} device, which the estimate cannot "
                     "time: the table counts them one after another."]
        elif jobs > 1:
            log("timing a --jobs unit's process start here (Python importing the study)")
            lanes, start = min(jobs, threads), start_seconds(per_job)
            extra = jobs_lines(jobs, per_job, lanes, jobs_wall_time(config, num_classes, sizes, timings, lanes, start),
                               sum(stage.total for stage in stages), start)
    return format_estimate(stages, machine, extra)

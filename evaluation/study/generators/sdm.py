"""The Semantic Diffusion Model (`kind: sdm`): trained (`main.py train`) and finetuned with null labels (`main.py
finetune`) on a real subset, then sampled in any `main.py sample` mode (noise, inpaint, harmonize, variation, ...),
optionally for new masks of a mask generator (masks.py). One SDM is trained per (subset, settings) and serves every
generator that samples it; a generator's `sdm_fraction` names the subset (default: the fraction it is used at)
and its `sdm` key changes the settings (a lever's ablation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guided_diffusion.config import config_from_dict

from ..context import Study, fingerprint
from ..units import (Part, PlannedUnit, Planner, Rate, Term, fraction_tag, sampled_forwards, sampling_terms,
                    settings_key, training_steps)
from .masks import plan as plan_masks
from .sampling import planned_sample_config, run_sample_unit, sample_values

REPORT_GROUP = "sdm"


def trained_at(generator, fraction: float) -> float:
    """The fraction whose subset trains the SDM a generator samples at `fraction`."""
    return generator.sdm_fraction if generator.sdm_fraction is not None else fraction


def plan(planner: Planner, fraction: float, name: str) -> list[PlannedUnit]:
    """The SDM's training and finetuning where this is its first use, the mask generator's training where the
    generator has one, and the sampling."""
    config = planner.config
    generator = config.generators[name]
    settings = config.sdm_settings(name)
    subset = trained_at(generator, fraction)
    units: list[PlannedUnit] = []
    model_unit = planner.sdms.get((subset, settings_key(settings)))
    if model_unit is None:
        trained = _sdm_units(planner, settings, subset, name)
        units += trained
        model_unit = planner.sdms[subset, settings_key(settings)] = trained[-1].id
    sample = planned_sample_config(planner, name, with_model=True)
    needs = [("model", model_unit)]
    parts = []
    if generator.mask_generator is not None:
        masks_unit, masks_part = plan_masks(planner, fraction, name, sample)
        units.append(masks_unit)
        needs.append(("masks", masks_unit.id))
        parts.append(masks_part)
    train_values = {**planner.common, **settings.get("model", {}), **settings["train"]}
    train, _ = config_from_dict("train", train_values, "study sdm.train")
    forwards, guided = sampled_forwards(sample, train.diffusion_steps)
    size = config.image_size
    parts.append(Part(f"generator {name} ({fraction_tag(fraction)})",
                      f"{sample.num_samples} images x {forwards:g} forwards at {size} px",
                      sampling_terms(sample.num_samples, forwards, guided, sample.batch_size, "sdm", size,
                                     train_values)))
    unit = PlannedUnit("sample", (fraction, name), tuple(parts), tuple(needs))
    planner.made[fraction][name] = (sample.num_samples, unit.id)
    return [*units, unit]


def _sdm_units(planner: Planner, settings: dict[str, Any], fraction: float, name: str) -> list[PlannedUnit]:
    """The training and finetuning of an SDM of `settings` on the subset of `fraction` (first used by `name`)."""
    tag, model = fraction_tag(fraction), settings.get("model", {})
    images = planner.sizes.subsets[fraction]
    train_values = {**planner.common, **model, **settings["train"]}
    train, _ = config_from_dict("train", train_values, "study sdm.train")
    steps = training_steps(train, images)
    crop = f", {train.crop_size} px crops" if train.crop_size else f" at {train.image_size} px"
    twins = planner.sdm_trains.setdefault((fraction, length_free_key(settings)), [])
    shorter = max((twin for twin in twins if twin[0] < steps), default=None) if train.max_steps else None
    work = f"{steps:,} steps of batch {train.batch_size}{crop}"
    if shorter is not None:
        work += f", the first {shorter[0]:,} those of {shorter[1]}"
    trained = PlannedUnit("sdm-train", (fraction, name), (Part(
        f"SDM training ({tag}, as {name})", work,
        (Term(steps - (shorter[0] if shorter else 0), Rate(
            "sdm", "train_step", train.batch_size, train.crop_size or train.image_size, train_values)),)),),
        (("shorter", shorter[1]),) if shorter else ())
    if train.max_steps:
        twins.append((steps, trained.id))
    if settings.get("finetune") is None:
        return [trained]
    tune, _ = config_from_dict("finetune", {**planner.common, **model, **settings["finetune"],
                                            "resume_checkpoint": "x"}, "study sdm.finetune")
    steps = training_steps(tune, images)
    # timed with the train values: the same network, its step at the finetune batch and crop (estimate.py)
    tuned = PlannedUnit("sdm-finetune", (fraction, name), (Part(
        f"SDM finetuning ({tag}, as {name})", f"{steps:,} steps of batch {tune.batch_size}",
        (Term(steps, Rate("sdm", "finetune_step", tune.batch_size, tune.crop_size or tune.image_size,
                          train_values)),)),), (("trained", trained.id),))
    return [trained, tuned]


def length_free_key(settings: dict[str, Any]) -> str:
    """What two SDMs that differ only in how long they train (`train.max_steps`) share: the longer one's run is
    the shorter one's, continued (training is exact across a resume, and nothing in it depends on max_steps), so
    the plan has it continue the shorter one instead of starting over."""
    train = {k: v for k, v in settings["train"].items() if k != "max_steps"}
    return settings_key({"model": settings.get("model", {}), "train": train})


def with_best_epoch_rule(values: dict[str, Any]) -> dict[str, Any]:
    """An SDM unit's values as its fingerprint sees them: ISDM's best-epoch rule (best_by "epoch_loss", the only
    rule before the key existed) leaves the key out, so SDMs trained by it keep their fingerprints; any other rule,
    the default "fixed_batch" included, is written in, so a study trained before the default changed trains its
    SDM again instead of reusing one whose best.pt was chosen by the old rule."""
    rule = values.get("best_by", "fixed_batch")
    rest = {k: v for k, v in values.items() if k != "best_by"}
    return rest if rule == "epoch_loss" else {**rest, "best_by": rule}


def _common(study: Study, fraction: float, name: str) -> dict[str, Any]:
    return {**study.config.generator_keys(str(study.subset_dir(fraction)), study.num_classes),
            **study.config.sdm_settings(name).get("model", {})}


def _train(study: Study, unit: PlannedUnit, action: str, values: dict[str, Any], what: str,
           shorter: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train (or finetune) the SDM of `values` on the unit's subset into generator/<fraction>/<train key>/; a
    training continues the run of `shorter` (the ledger entry of the same SDM trained fewer steps) where it
    can. Its key is that of a run from scratch: the weights are the same."""
    fraction, name = unit.where
    subset_key = study.subset_key(fraction)
    key = fingerprint(f"sdm-{action}", with_best_epoch_rule(values), subset_key)
    train_key = key if action == "train" else fingerprint(
        "sdm-train", with_best_epoch_rule(_train_values(study, fraction, name)), subset_key)
    root = study.root / "generator" / fraction_tag(fraction) / train_key

    def work() -> dict[str, Any]:
        from guided_diffusion.train import run_training

        start = continued_from(study, shorter, values) if shorter is not None else None
        config, notes = config_from_dict(action, {**values, "root_log_dir": str(root), "auto_resume": True,
                                                  **({"resume_checkpoint": str(start)} if start else {})},
                                         f"study sdm.{action}")
        for note in notes:
            study.log(f"note: {note}")
        result = run_training(config, action, study.log)
        if result.stop_signal:
            raise KeyboardInterrupt(f"{action} stopped by {result.stop_signal}")
        return {"run_dir": str(result.run_dir), "best_epoch": result.state.best_epoch,
                "precision": study.precision(config.precision),
                "steps": result.state.step, "stop_reason": result.stop_reason,
                **({"continued": str(start)} if start else {})}

    return study.unit(unit, key, what, work)


def continued_from(study: Study, shorter: dict[str, Any], values: dict[str, Any]) -> Path | None:
    """The latest.pt of `shorter`'s run, where this training can continue it, else None (and why, in the log): that
    run must have ended at its max_steps, in the precision this one runs in, and its latest.pt must be there."""
    latest = Path(shorter["run_dir"]) / "checkpoints" / "latest.pt"
    precision = study.precision(values.get("precision", "auto"))
    if shorter.get("stop_reason") != "max_steps reached":
        why = f"it ended with \"{shorter.get('stop_reason')}\", not at its max_steps"
    elif shorter.get("precision", "fp32") != precision:
        why = f"it ran in {shorter.get('precision', 'fp32')}, this run in {precision}"
    elif not latest.is_file():
        why = f"{latest} is missing"
    else:
        study.log(f"continuing the SDM trained {shorter['steps']:,} steps ({shorter['unit']}) from {latest}: the "
                  f"same weights as training from scratch")
        return latest
    study.log(f"training from scratch, not from the shorter run of {shorter['unit']}: {why}")
    return None


def _train_values(study: Study, fraction: float, name: str) -> dict[str, Any]:
    return {**_common(study, fraction, name), **study.config.sdm_settings(name)["train"]}


def train(study: Study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    fraction, name = unit.where
    images = len(study.split.subsets[fraction])
    return _train(study, unit, "train", _train_values(study, fraction, name),
                  f"training the SDM on {images} images ({fraction_tag(fraction)})", needs.get("shorter"))


def finetune(study: Study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    fraction, name = unit.where
    values = {**_common(study, fraction, name), **study.config.sdm_settings(name)["finetune"],
              "resume_checkpoint": needs["trained"]["run_dir"]}
    return _train(study, unit, "finetune", values,
                  f"finetuning the SDM with null labels ({fraction_tag(fraction)})")


def sample(study: Study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    fraction, name = unit.where
    values = sample_values(study, fraction, name, with_model=True)
    values["model_path"] = str(Path(needs["model"]["run_dir"]))
    if "masks" in needs:
        values["mask_source"] = str(Path(needs["masks"]["run_dir"]))
    return run_sample_unit(study, unit, values)


def note(entry: dict[str, Any]) -> str:
    """How its images were made, for the report."""
    seconds = entry.get("seconds_per_image")
    speed = f", {seconds:.2f} s an image" if seconds is not None else ""
    return f"{entry['images']} images sampled from the SDM{speed} ({entry.get('precision', 'fp32')})"


EXECUTORS = {"sdm-train": train, "sdm-finetune": finetune}

"""What the generator kinds that make images with `main.py sample` share: the sample config of a generator, and
the "sample" unit that runs it into `synthetic/<fraction>/<name>-<key>/`."""

from __future__ import annotations

from typing import Any

from guided_diffusion.config import SampleConfig, config_from_dict

from ..context import Study, fingerprint
from ..units import PlannedUnit, Planner, fraction_tag


def planned_sample_config(planner: Planner, name: str, with_model: bool) -> SampleConfig:
    """Generator `name`'s sample config as the plan prices it: with the SDM's model keys (`with_model`), and
    stand-ins for the model and mask folders that the units it needs will make."""
    config = planner.config
    generator = config.generators[name]
    model = config.sdm_settings(name).get("model", {}) if with_model else {}
    values = {**planner.common, **model, **generator.sample_keys}
    if with_model:
        values["model_path"] = "x"
    if generator.mask_generator is not None:
        values["mask_source"] = "x"
    sample, _ = config_from_dict("sample", values, f"study generators.{name}")
    return sample


def sample_values(study: Study, fraction: float, name: str, with_model: bool) -> dict[str, Any]:
    """The `main.py sample` keys of generator `name` at `fraction`: the study's, the SDM's model keys (`with_model`),
    the study's seed and the generator's sample keys."""
    config = study.config
    model_keys = config.sdm_settings(name).get("model", {}) if with_model else {}
    return {**config.generator_keys(str(study.subset_dir(fraction)), study.num_classes), **model_keys,
            "seed": config.seed, **config.generators[name].sample_keys}


def run_sample_unit(study: Study, unit: PlannedUnit, values: dict[str, Any]) -> dict[str, Any] | None:
    """Sample generator `name`'s pairs at the unit's fraction with the sample keys `values`; returns its ledger
    entry (run_dir, images, seconds per image), or None when this run may not run it and it is not done."""
    from guided_diffusion.sampling.sample import run_sampling

    from ...freemask import measure_hardness  # the scorer of hardness_args, handed to the sample action

    fraction, name = unit.where[:2]
    generator = study.config.generators[name]
    key = fingerprint("sample", values, study.subset_key(fraction), generator.kind)
    root = study.root / "synthetic" / fraction_tag(fraction) / f"{name}-{key}"

    def work() -> dict[str, Any]:
        # auto_resume: a unit stopped mid-way (a session's end, a Slurm time limit) keeps the images it wrote
        config, notes = config_from_dict("sample", {**values, "root_log_dir": str(root), "auto_resume": True},
                                         f"study generators.{name}")
        for note in notes:
            study.log(f"note: {note}")
        summary = run_sampling(config, set(values), f"study generators.{name}", study.log, measure_hardness)
        if summary.get("stop_signal"):
            raise KeyboardInterrupt(f"sampling stopped by {summary['stop_signal']}")
        return {"run_dir": summary["run_dir"], "images": summary["num_samples"],
                "seconds_per_image": summary.get("seconds_per_image"),
                "precision": study.precision(config.precision)}

    return study.unit(unit, key, f"generator {name} ({generator.kind}) at {fraction_tag(fraction)}", work)

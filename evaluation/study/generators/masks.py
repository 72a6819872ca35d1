"""The mask generator of an SDM generator (key `mask_generator`, `main.py masks` keys): trained on the masks of the
fraction's subset, it paints the new masks the SDM draws images for (sample key `mask_source`)."""

from __future__ import annotations

from typing import Any

from guided_diffusion.config import SampleConfig, config_from_dict
from guided_diffusion.masks.model import POOL_FACTOR

from ..context import Study, fingerprint
from ..units import Part, PlannedUnit, Planner, Rate, Term, fraction_tag, sampling_terms, training_steps


def plan(planner: Planner, fraction: float, name: str, sample: SampleConfig) -> tuple[PlannedUnit, Part]:
    """The mask generator's training unit, and the part of the sample unit that paints its masks."""
    config = planner.config
    tag = fraction_tag(fraction)
    values = {**config.mask_generator_keys(config.data_dir, planner.num_classes),
              **config.generators[name].mask_generator}
    masks, _ = config_from_dict("masks", values, f"study generators.{name}.mask_generator")
    steps = training_steps(masks, planner.sizes.subsets[fraction])
    unit = PlannedUnit("masks-train", (fraction, name), (Part(
        f"mask generator of {name} ({tag})", f"{steps:,} steps of batch {masks.batch_size} at {masks.image_size} px",
        (Term(steps, Rate("masks", "train_step", masks.batch_size, masks.image_size, values)),)),))
    pool = POOL_FACTOR if sample.balance_args else 1  # candidates to choose among
    guided = 1.0 if sample.mask_guidance > 1.0 else 0.0
    per_mask = sample.mask_steps * (1.0 + guided)
    count = pool * sample.num_samples
    part = Part(f"new masks for {name} ({tag})", f"{count} masks x {per_mask:g} forwards",
                sampling_terms(count, per_mask, guided, sample.batch_size, "masks", masks.image_size, values))
    return unit, part


def train(study: Study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Train generator `name`'s mask generator on the subset's masks into masks/<fraction>/<key>/."""
    from guided_diffusion.masks.train import mask_config, train_mask_generator

    fraction, name = unit.where
    config = study.config
    values = {**config.mask_generator_keys(str(study.subset_dir(fraction)), study.num_classes), "seed": config.seed,
              **(config.generators[name].mask_generator or {})}
    key = fingerprint("masks-train", values, study.subset_key(fraction))

    def work() -> dict[str, Any]:
        masks = mask_config({**values, "root_log_dir": str(study.root / "masks" / fraction_tag(fraction) / key),
                             "auto_resume": True}, f"study generators.{name}.mask_generator")
        result = train_mask_generator(masks, study.log)
        if result.stop_signal:
            raise KeyboardInterrupt(f"masks stopped by {result.stop_signal}")
        return {"run_dir": str(result.run_dir), "steps": result.state.step, "stop_reason": result.stop_reason,
                "precision": study.precision(masks.precision)}

    return study.unit(unit, key, f"training the mask generator of {name} on the masks of {fraction_tag(fraction)}",
                      work)


EXECUTORS = {"masks-train": train}

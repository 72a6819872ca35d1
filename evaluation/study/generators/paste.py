"""Copy-paste (`kind: paste`): the subset's real defects pasted onto its defect-free images (`main.py sample` with
mode "paste"); no model."""

from __future__ import annotations

from typing import Any

from ..units import Part, PlannedUnit, Planner, fraction_tag
from .sampling import planned_sample_config, run_sample_unit, sample_values

REPORT_GROUP = "paste"


def plan(planner: Planner, fraction: float, name: str) -> list[PlannedUnit]:
    config = planned_sample_config(planner, name, with_model=False)
    unit = PlannedUnit("sample", (fraction, name), (Part(f"generator {name} ({fraction_tag(fraction)})",
                                                         f"{config.num_samples} images, no model"),))
    planner.made[fraction][name] = (config.num_samples, unit.id)
    return [unit]


def sample(study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    return run_sample_unit(study, unit, sample_values(study, unit.where[0], unit.where[1],
                                                                        with_model=False))


def note(entry: dict[str, Any]) -> str:
    """How its images were made, for the report."""
    return f"{entry['images']} images, real defects pasted (no model)"

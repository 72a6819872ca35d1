"""The study's generator kinds, one module each. Adding a kind means one module and its test.

A kind module has:
- `plan(planner, fraction, name) -> list[PlannedUnit]`: the units that make generator `name`'s images at
  `fraction`, with their work (what `--estimate` prices) and the units they need; the units of a model it trains
  first, where this is the model's first use (an SDM serves every generator of its settings);
- `sample(study, unit, needs) -> entry | None` where it makes images with `main.py sample`, and the executors of
  the other unit kinds it plans in `EXECUTORS` ({unit kind: run(study, unit, needs)}): each makes the unit's
  fingerprint from its inputs and the ledger entries of the units it needs, and runs it through `study.unit`;
- `note(entry) -> str`: how a unit of its made its images, from the unit's ledger entry (the report's
  "Generator" table);
- `REPORT_GROUP` (the kinds of the config's `kind` values): how the report colours and groups the variants
  its images go into ("sdm": made by a diffusion model, whose share of a gain the report pairs out).

`sdm` (inpaint, harmonize, noise, ... modes of `main.py sample`) and `paste` are the config's `kind` values;
`filtered` is chosen by `labels: "filtered"` (FreeMask filtering of another generator's images); `masks` is the
mask generator an SDM generator may paint new masks with (key `mask_generator`)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..config import Generator
from . import filtered, masks, paste, sdm  # noqa: F401 (masks: EXECUTORS)

KINDS: dict[str, ModuleType] = {"sdm": sdm, "paste": paste}
"""The modules of the config's generator `kind` values."""


def kind_of(generator: Generator) -> ModuleType:
    """The module that plans and runs a generator."""
    return filtered if generator.labels == "filtered" else KINDS[generator.kind]


def report_group(generator: Generator) -> str:
    """The report's group of a generator's images (a filtered generator's kind is its source's)."""
    return KINDS[generator.kind].REPORT_GROUP


def report_note(generator: Generator, entry: dict[str, Any]) -> str:
    """How a generator's images were made (its sample or filter unit's ledger entry), in the kind's words."""
    return kind_of(generator).note(entry)


def run_sample(study, unit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A "sample" unit, run by the kind of its generator."""
    return kind_of(study.config.generators[unit.where[1]]).sample(study, unit, needs)


EXECUTORS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "sample": run_sample, **sdm.EXECUTORS, **masks.EXECUTORS, **filtered.EXECUTORS}
"""The executor of each unit kind a generator plans."""

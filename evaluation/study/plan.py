"""The study as one plan: the list of its units in run order, each with the work it does and the units it needs
(units.py). The runner (run.py) executes this list, here or as Slurm jobs (slurm.py); `--estimate` prices it
(estimate.py); the progress lines count it (progress.py); the report reads the ledger entries of its units.

Each generator kind plans its own units (generators/); this module walks the fractions and plans the segmenters
and label alignments after them.
"""

from __future__ import annotations

from .config import StudyConfig
from .generators import kind_of
from .units import Part, PlannedUnit, Planner, SplitSizes, Term, checks, fraction_tag


def plan_units(config: StudyConfig, num_classes: int, sizes: SplitSizes) -> list[PlannedUnit]:
    """Every unit of the study, in the order the runner (run.py) runs them: per fraction, each generator's units
    as its kind plans them (generators/: an SDM's training where this is its first use, a mask generator, then the
    sampling or filtering); then the segmenters, the real-only baseline first, each real-only seed followed by
    its label alignment with every generator of the fraction. `--estimate` prices this list, the progress lines
    count it, and the report reads the ledger entries of its units."""
    planner = Planner(config, num_classes, sizes)
    protocol = config.segmenter
    units: list[PlannedUnit] = []
    for fraction in config.real_fractions:
        tag = fraction_tag(fraction)
        made = planner.made.setdefault(fraction, {})
        for name in config.generators_at(fraction):  # sources of filtered generators come first
            units += kind_of(config.generators[name]).plan(planner, fraction, name)
        count = checks(protocol.steps, protocol.select_every) * sizes.val + sizes.test
        segmenter = Part(f"segmenters ({tag})",
                         f"{protocol.steps:,} steps of batch {protocol.batch_size} + "
                         f"{checks(protocol.steps, protocol.select_every)} checks on {sizes.val} val images + "
                         f"{sizes.test} test images",
                         (Term(protocol.steps, planner.segmenter_step()), Term(count, planner.segmenter_image())))
        for variant in sorted(config.variants_at(fraction), key=lambda v: not v.is_baseline):  # baseline first
            for seed in protocol.seeds:
                unit = PlannedUnit("segmenter", (fraction, variant.name, seed), (segmenter,),
                                   tuple((name, made[name][1]) for name in variant.synthetic))
                units.append(unit)
                if variant.is_baseline:  # label alignment, a unit per generator
                    for name, (images, made_by) in made.items():
                        units.append(PlannedUnit("alignment", (fraction, name, seed), (Part(
                            f"label alignment of {name} ({tag})", f"{images} generated images segmented",
                            (Term(images, planner.segmenter_image()),)),),
                            (("segmenter", unit.id), ("generated", made_by))))
    return units

"""FreeMask filtering (`labels: "filtered"`, `source`: another generator): a scorer trained on the subset's real
images (one per subset, cached under scorers/) marks the synthetic pixels of the source's images it finds
implausible as ignored; the segmenters train on those labels (labels_filtered/)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from ..context import Study, fingerprint
from ..units import Part, PlannedUnit, Planner, Term, fraction_tag

def plan(planner: Planner, fraction: float, name: str) -> list[PlannedUnit]:
    protocol = planner.config.segmenter
    source = planner.config.generators[name].source
    images, source_unit = planner.made[fraction][source]
    work, terms = f"{images} images segmented", [Term(images, planner.segmenter_image())]
    needs = [("source", source_unit)]
    scorer = planner.scorers.get(fraction)
    if scorer is None:  # one scorer per subset, trained by the first filter and cached under scorers/
        work = f"a scorer of {protocol.steps:,} steps + " + work
        terms.append(Term(protocol.steps, planner.segmenter_step()))
    else:  # the next filters wait for it (as Slurm jobs, two would train it at once)
        needs.append(("scorer", scorer))
    unit = PlannedUnit("filter", (fraction, name),
                       (Part(f"FreeMask filter {name} ({fraction_tag(fraction)})", work, tuple(terms)),), tuple(needs))
    planner.scorers.setdefault(fraction, unit.id)
    planner.made[fraction][name] = (images, unit.id)
    return [unit]


def filter_images(study: Study, unit: PlannedUnit, needs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Filter the images of the source's run into a folder of its own that links the source's files, so that the
    source stays as sampled and each filter setting keeps its own labels."""
    from ...freemask import FILTER_REPORT, filter_folders
    from ...image_sets import index_sample_folder
    from ...segmenter.settings import ScorerSettings

    fraction, name = unit.where
    source = needs["source"]
    config, protocol = study.config, study.config.segmenter
    generator = config.generators[name]
    settings = generator.filter
    scorer = ScorerSettings(protocol.architecture, protocol.encoder, config.image_size, config.resize_mode,
                            protocol.steps, protocol.batch_size, protocol.lr, protocol.weight_decay, True, config.seed)
    key = fingerprint("filter", source["fingerprint"], dataclasses.asdict(settings), dataclasses.asdict(scorer))
    data_dir = study.subset_dir(fraction)
    run_dir = study.root / "synthetic" / data_dir.name / f"{name}-{key}" / "sample_001"

    def work() -> dict[str, Any]:
        if not (run_dir / FILTER_REPORT).is_file():  # a kill after the filter wrote its files: reuse them
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a copy cut short by a kill (the study's own folder)
            run_dir.mkdir(parents=True)
            origin = Path(source["run_dir"])
            for entry in origin.iterdir():
                if entry.is_dir() and entry.name in ("samples", "labels", "images", "colored_labels"):
                    (run_dir / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
            shutil.copyfile(origin / "config.json", run_dir / "config.json")
            folder = index_sample_folder(run_dir, study.num_classes)
            filter_folders([folder], str(data_dir), config.dataset_mode, study.num_classes, scorer, settings,
                           str(study.root / "scorers"), True, study.device, study.log, study.progress)
        report = json.loads((run_dir / FILTER_REPORT).read_text(encoding="utf-8"))
        return {"run_dir": str(run_dir), "images": report["kept_images"], "dropped": report["dropped_images"],
                "ignored_pixel_share": report["ignored_pixel_share"], "labels": "filtered"}

    return study.unit(unit, key, f"filtering {generator.source}'s images into {name} ({fraction_tag(fraction)})",
                      work)


def note(entry: dict[str, Any]) -> str:
    """How its labels were made, for the report."""
    return (f"{entry['images']} images kept, {entry['dropped']} dropped; {100 * entry['ignored_pixel_share']:.1f} % "
            "of their pixels marked ignored by the FreeMask scorer")


EXECUTORS = {"filter": filter_images}

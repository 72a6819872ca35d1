"""The study's one plan (evaluation/study/plan.py): the units and what each needs, the generator kinds that plan
them (evaluation/study/generators/), and the Slurm submission of the units not done (evaluation/study/slurm.py),
here with a stand-in for sbatch. That the plan is what a study runs is checked on a finished study in
test_study.py."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from evaluation.study import generators
from evaluation.study.config import GENERATOR_KINDS, study_from_dict
from evaluation.study.plan import plan_units
from evaluation.study.units import UNIT_KINDS, PlannedUnit, SplitSizes
from evaluation.study.slurm import ACTIVE_STATES, parse_kind_args, submit_study
from guided_diffusion.errors import ConfigError

from test_study import study_values

SIZES = SplitSizes(val=2, subsets={0.5: 5, 1.0: 10}, test=4)


def planned(demo_dir, tmp_path, **changes) -> list[PlannedUnit]:
    values = study_values(demo_dir, tmp_path / "study", **changes)
    return plan_units(study_from_dict(values, "test"), 4, SIZES)


def test_every_unit_needs_only_units_planned_before_it_and_has_a_unique_id(demo_dir, tmp_path):
    units = planned(demo_dir, tmp_path)
    seen: set[str] = set()
    for unit in units:
        assert unit.kind in UNIT_KINDS
        assert unit.id not in seen
        assert all(needed in seen for _, needed in unit.needs), unit
        seen.add(unit.id)


def test_each_unit_needs_the_units_whose_results_it_reads(demo_dir, tmp_path):
    needs = {unit.id: dict(unit.needs) for unit in planned(demo_dir, tmp_path)}
    # the SDM is trained at 50 % on first use; its finetuning, then each sampling of it, wait for it
    assert needs["sdm-finetune/r050/sdm"] == {"trained": "sdm-train/r050/sdm"}
    assert needs["sample/r050/sdm_inpaint"] == {"model": "sdm-finetune/r050/sdm"}
    assert needs["sample/r050/paste"] == {}  # no model
    assert needs["filter/r050/sdm_filtered"] == {"source": "sample/r050/sdm"}
    # a segmenter needs the images of its variant's generators; the real-only one none
    assert needs["segmenter/r050/sdm_only/1"] == {"sdm": "sample/r050/sdm"}
    assert needs["segmenter/r050/real/0"] == {}
    assert needs["alignment/r100/paste/1"] == {"segmenter": "segmenter/r100/real/1",
                                               "generated": "sample/r100/paste"}


def test_a_second_filter_of_a_subset_waits_for_the_first_which_trains_their_scorer(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "study")
    values["generators"]["paste_filtered"] = {"kind": "paste", "labels": "filtered", "source": "paste"}
    values["variants"].append({"name": "paste_filtered", "synthetic": ["paste_filtered"], "fractions": [0.5]})
    units = {unit.id: unit for unit in plan_units(study_from_dict(values, "test"), 4, SIZES)}
    assert dict(units["filter/r050/paste_filtered"].needs)["scorer"] == "filter/r050/sdm_filtered"
    assert "a scorer" in units["filter/r050/sdm_filtered"].parts[0].work
    assert "a scorer" not in units["filter/r050/paste_filtered"].parts[0].work


def test_every_generator_kind_of_the_config_has_its_module_with_the_plug_in_parts():
    assert tuple(generators.KINDS) == GENERATOR_KINDS
    for module in [*generators.KINDS.values(), generators.filtered]:
        assert callable(module.plan) and isinstance(module, ModuleType)
    for module in generators.KINDS.values():
        assert callable(module.sample) and module.REPORT_GROUP
    for module in [*generators.KINDS.values(), generators.filtered]:
        assert callable(module.note)
    assert set(generators.EXECUTORS) | {"segmenter", "alignment"} == set(UNIT_KINDS)


def test_a_kind_plans_its_units_through_its_module(demo_dir, tmp_path, monkeypatch):
    """Adding a kind is one module: the plan asks the module of a generator's kind for its units."""
    calls = []

    def plan(planner, fraction, name):
        calls.append((fraction, name))
        unit = PlannedUnit("sample", (fraction, name), ())
        planner.made[fraction][name] = (3, unit.id)
        return [unit]

    stand_in = ModuleType("stand_in")
    stand_in.plan, stand_in.REPORT_GROUP = plan, "paste"
    monkeypatch.setitem(generators.KINDS, "paste", stand_in)
    units = planned(demo_dir, tmp_path)
    assert calls == [(0.5, "paste"), (1.0, "paste")]
    alignment = next(u for u in units if u.id == "alignment/r050/paste/0")
    assert alignment.parts[0].work == "3 generated images segmented"


# ---------------------------------------------------------------------------------------------------------------
# Slurm submission, with a stand-in for sbatch and squeue


class StandInSbatch:
    def __init__(self, states=None, first_job: int = 100):
        self.jobs: list[list[str]] = []
        self.known = states or {}
        self.first_job = first_job

    def submit(self, args: list[str]) -> int:
        self.jobs.append(args)
        return self.first_job + len(self.jobs)

    def states(self, job_ids):
        return {job: self.known[job] for job in job_ids if job in self.known}


def option(args: list[str], name: str) -> str | None:
    return next((arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")), None)


def test_slurm_submits_each_unit_not_done_after_the_jobs_of_the_units_it_needs(demo_dir, tmp_path):
    units = planned(demo_dir, tmp_path, real_fractions=[0.5])
    done = {unit.id: ({"kind": unit.kind} if unit.id == "sample/r050/paste" else None) for unit in units}
    sbatch = StandInSbatch()
    jobs = submit_study(tmp_path / "study", units, done, ["-c", "study.json"], ["--time=1:00:00"],
                        parse_kind_args(["sdm-train=--gres=gpu:1 --mem=16G"]), lambda *_: None, sbatch)
    by_name = {option(args, "job-name"): args for args in sbatch.jobs}
    assert "study:sample/r050/paste" not in by_name  # done
    assert len(sbatch.jobs) == len(units) - 1 + 1  # and the report job
    train = by_name["study:sdm-train/r050/sdm"]
    assert option(train, "dependency") is None and train[-4:-2] == ["--gres=gpu:1", "--mem=16G"]
    assert "--time=1:00:00" in train
    assert option(by_name["study:sdm-finetune/r050/sdm"], "dependency") == f"afterok:{jobs['sdm-train/r050/sdm']}"
    # the alignment waits for its real-only segmenter; the paste images are done already
    assert option(by_name["study:alignment/r050/paste/0"], "dependency") == \
        f"afterok:{jobs['segmenter/r050/real/0']}"
    command = train[-1]
    assert "--unit sdm-train/r050/sdm" in command and "-c study.json" in command
    report = by_name["study:report"]
    unit_jobs = sorted(set(jobs.values()) - {jobs["report"]})
    assert option(report, "dependency") == "afterany:" + ":".join(map(str, unit_jobs))
    assert "--report-only" in report[-1]


def test_slurm_resubmits_neither_done_units_nor_units_whose_earlier_job_is_still_queued(demo_dir, tmp_path):
    units = planned(demo_dir, tmp_path, real_fractions=[1.0],
                    variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    first = StandInSbatch()
    earlier = submit_study(tmp_path / "study", units, {}, ["-c", "x"], [], {}, lambda *_: None, first)
    waiting = earlier["segmenter/r100/real/0"]
    second = StandInSbatch({waiting: "PENDING", earlier["segmenter/r100/real/1"]: "CANCELLED"}, first_job=200)
    assert "PENDING" in ACTIVE_STATES and "CANCELLED" not in ACTIVE_STATES
    lines = []
    jobs = submit_study(tmp_path / "study", units, {}, ["-c", "x"], [], {}, lines.append, second)
    names = [option(args, "job-name") for args in second.jobs]
    assert "study:segmenter/r100/real/0" not in names and "study:segmenter/r100/real/1" in names
    assert jobs["segmenter/r100/real/0"] == waiting
    alignment = next(args for args in second.jobs if option(args, "job-name") == "study:alignment/r100/paste/0")
    assert option(alignment, "dependency").startswith(f"afterok:{waiting}")
    assert "1 still queued from before" in lines[0]
    assert json.loads((tmp_path / "study" / "slurm" / "jobs.json").read_text())["segmenter/r100/real/0"] == waiting


def test_a_bad_sbatch_kind_is_one_line_naming_the_kinds():
    with pytest.raises(ConfigError, match="--sbatch-kind 'gpu=--gres=gpu:1'.*sdm-train"):
        parse_kind_args(["gpu=--gres=gpu:1"])


def test_slurm_checks_the_segmenters_weights_before_it_submits_anything(demo_dir, tmp_path, monkeypatch, capsys):
    from evaluation.study import slurm
    from evaluation.study.run import main as study_main

    def refuse(self, args):
        raise AssertionError("submitted a job")
    monkeypatch.setattr(slurm.Sbatch, "submit", refuse)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/sbatch")
    weights = tmp_path / "encoder.pt"
    weights.write_bytes(b"not a weights file")
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0], variants=[{"name": "real"}])
    values["segmenter"]["encoder_weights"] = str(weights)
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    assert study_main(["-c", str(path), "--slurm"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(weights) in error[0], error
    assert not (tmp_path / "study" / "slurm").exists()


def test_wait_returns_once_slurm_lists_none_of_the_jobs_as_active():
    from evaluation.study.slurm import wait_for

    answers = iter([{1: "RUNNING", 2: "PENDING"}, {1: "COMPLETED", 2: "RUNNING"}, {2: "FAILED"}])
    asked = []

    class Queue(StandInSbatch):
        def states(self, job_ids):
            asked.append(list(job_ids))
            return next(answers)

    wait_for([1, 2], Queue(), poll=0)
    assert asked == [[1, 2]] * 3


@pytest.mark.parametrize("options, message", [
    (["--unit", "segmenter/r100/pasta/0"], "error: --unit segmenter/r100/pasta/0: the study has no such unit (did "
                                           "you mean 'segmenter/r100/paste/0'?); --list-units lists them"),
    (["--unit", "segmenter/r100/paste/0"], "error: --unit segmenter/r100/paste/0: the units it needs are not all in "
                                           "the ledger of "),
    (["--slurm", "--report-only"], "error: --slurm and --report-only do not go together: give one of them"),
    (["--wait"], "error: --wait, --sbatch-args and --sbatch-kind only apply with --slurm"),
])
def test_a_bad_unit_or_mode_option_is_one_line(demo_dir, tmp_path, capsys, options, message):
    from evaluation.study.run import main as study_main

    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    values["generators"] = {"paste": values["generators"]["paste"]}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    assert study_main(["-c", str(path), *options]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(message), error
    assert not (tmp_path / "study" / "ledger.jsonl").exists()

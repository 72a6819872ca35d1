"""The low-data study (`evaluation/experiment.sh`): every stage at toy size, resume, the report's contents, and
the one-line errors of its config."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.study import estimate
from evaluation.study.estimate import (ModelCosts, SegmenterCosts, SplitSizes, Stage, format_duration, format_estimate,
                                       plan_study)
from evaluation.study.run import Ledger, main as study_main, run_study
from evaluation.study.config import SegmenterProtocol, load_study, study_from_dict
from evaluation.study.report import paired_interval, without_sdm
from guided_diffusion.errors import ConfigError

from conftest import TINY_MODEL, make_scene_dataset


def study_values(data_dir, output_dir, **changes) -> dict:
    """A study with every kind of variant: real-only, classic augmentation, paste, SDM (noise and inpaint) and
    synthetic only; toy-sized so that the whole study takes about a minute on CPU."""
    values = {
        "data_dir": str(data_dir),
        "output_dir": str(output_dir),
        "num_classes": 4,
        "real_fractions": [0.5, 1.0],
        "image_size": 32,
        "segmenter": {"steps": 4, "batch_size": 4, "select_every": 2, "seeds": [0, 1]},
        "sdm": {"model": {k: v for k, v in TINY_MODEL.items() if k != "image_size"},
                "train": {"max_steps": 3, "batch_size": 4, "save_interval": 2, "log_interval": 1},
                "finetune": {"max_steps": 2, "batch_size": 4, "save_interval": 2, "log_interval": 1}},
        "generators": {
            "paste": {"kind": "paste", "sample": {"mask_split": "all", "num_samples": 4}},
            "sdm": {"kind": "sdm", "sample": {"mask_split": "all", "num_samples": 4, "sampler": "ddim", "steps": 2}},
            "sdm_inpaint": {"kind": "sdm", "sample": {"mode": "inpaint", "mask_split": "all", "num_samples": 4,
                                                     "steps": 2, "resample_steps": 0}},
            "sdm_filtered": {"kind": "sdm", "labels": "filtered", "source": "sdm",
                             "filter": {"max_ignored_fraction": 1.0}},
        },
        "variants": [
            {"name": "real"},
            {"name": "augment", "augment": "strong"},
            {"name": "paste", "synthetic": ["paste"]},
            {"name": "sdm", "synthetic": ["sdm"], "fractions": [0.5]},
            {"name": "sdm_inpaint", "synthetic": ["sdm_inpaint"], "fractions": [0.5]},
            {"name": "sdm_filtered", "synthetic": ["sdm_filtered"], "fractions": [0.5]},
            {"name": "sdm_only", "synthetic": ["sdm"], "real": False, "fractions": [0.5]},
        ],
    }
    values.update(changes)
    return values


@pytest.fixture(scope="module")
def finished_study(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "study"
    values = study_values(demo_dir, root)
    run_study(study_from_dict(values, "test"), values, "test command", log=lambda *_: None, progress=False)
    return root, values


def test_the_units_the_estimate_prices_are_exactly_the_units_the_study_ran_in_the_plans_order(finished_study):
    from evaluation.image_sets import resolve_num_classes
    from evaluation.study.run import make_split

    root, values = finished_study
    config = study_from_dict(values, "test")
    num_classes = resolve_num_classes(config)
    units = estimate.plan_units(config, num_classes, SplitSizes.of(make_split(config, num_classes)))
    ran = [json.loads(line)["unit"] for line in (root / "ledger.jsonl").read_text().splitlines()]
    assert ran == [unit.id for unit in units]
    stages = plan_study(config, num_classes, SplitSizes.of(make_split(config, num_classes)), FixedTimings())
    assert sum(stage.runs for stage in stages) == sum(len(unit.parts) for unit in units)


def test_every_unit_records_the_processor_and_precision_it_ran_with(finished_study):
    from guided_diffusion.model_setup import processor_name

    root, _ = finished_study
    entries = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    assert {entry["processor"] for entry in entries} == {processor_name()}
    assert all(entry["precision"] in ("bf16", "fp32") for entry in entries)
    assert {entry["threads"] for entry in entries} == {torch.get_num_threads()}
    # the toy study's segmenters and SDM leave precision at "auto": bf16 where the CPU has it natively
    assert {entry["kind"] for entry in entries} >= {"sdm-train", "sample", "segmenter"}


def test_the_report_says_how_many_cpu_threads_the_segmenters_ran_with():
    from evaluation.study.report import _threads_note

    assert _threads_note([{"threads": 2}, {"threads": 2}]) == "; 2 CPU threads per segmenter"
    assert _threads_note([{"threads": 1}, {}]) == \
        "; 1 CPU thread per segmenter where recorded (1 segmenter ran before the record)"
    assert _threads_note([{"threads": 2}, {"threads": 1}]).startswith("; 1 or 2 CPU threads per segmenter (the count")
    assert _threads_note([{"processor": "AMD EPYC"}]) == ""  # a ledger from before the record


def test_paired_segmenters_from_different_processor_models_are_named():
    from evaluation.study.report import mixed_processors

    rows = [{"fraction": 0.25, "seed": 0, "variant": "real", "processor": "AMD EPYC"},
            {"fraction": 0.25, "seed": 0, "variant": "paste", "processor": "Intel Xeon"},
            {"fraction": 0.25, "seed": 1, "variant": "real", "processor": "AMD EPYC"},
            {"fraction": 0.25, "seed": 1, "variant": "paste", "processor": "AMD EPYC"},
            {"fraction": 1.0, "seed": 0, "variant": "real"},  # a ledger from before the record
            {"fraction": 1.0, "seed": 0, "variant": "paste", "processor": "Intel Xeon"}]
    assert mixed_processors(rows) == ["25 % seed 0: AMD EPYC (real); Intel Xeon (paste)"]


def test_paired_segmenters_of_one_processor_name_in_two_precisions_are_named():
    # a virtual machine may show the same generic name for a CPU with native bf16 and one without; where the
    # study's precision is auto, the first ran in bf16 and the second in fp32, and their scores differ
    from evaluation.study.report import mixed_processors

    rows = [{"fraction": 0.25, "seed": 2, "variant": "real", "processor": "AMD EPYC", "precision": "bf16"},
            {"fraction": 0.25, "seed": 2, "variant": "paste", "processor": "AMD EPYC", "precision": "fp32"},
            {"fraction": 0.25, "seed": 3, "variant": "real", "processor": "AMD EPYC", "precision": "fp32"},
            {"fraction": 0.25, "seed": 3, "variant": "paste", "processor": "AMD EPYC", "precision": "fp32"}]
    assert mixed_processors(rows) == ["25 % seed 2: AMD EPYC, bf16 (real); AMD EPYC, fp32 (paste)"]


def test_the_cpu_model_carries_family_and_model_numbers_that_tell_two_generations_apart():
    from guided_diffusion.model_setup import cpu_model

    def cpuinfo(model: int) -> str:
        core = f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\n" \
               "model name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
        return core + "\n" + core.replace("processor\t: 0", "processor\t: 1") + "\n"

    assert cpu_model(cpuinfo(1)) == "AMD EPYC (family 25, model 1)"
    assert cpu_model(cpuinfo(17)) == "AMD EPYC (family 25, model 17)"
    # an ARM machine's /proc/cpuinfo has no family and model lines, and often no model name at all
    assert cpu_model("model name\t: Neoverse-V2\n") == "Neoverse-V2"
    assert cpu_model("processor\t: 0\nBogoMIPS\t: 2000.00\n") == ""


def test_the_report_names_the_processor_and_finds_no_mixed_pairs_in_a_one_machine_study(finished_study):
    from guided_diffusion.model_setup import bf16_autocast, processor_name

    root, _ = finished_study
    summary = json.loads((root / "summary.json").read_text())
    # the toy study leaves precision at "auto"
    machine = f"{processor_name()}, {'bf16' if bf16_autocast('auto', torch.device('cpu')) else 'fp32'}"
    assert summary["processors"] == [machine] and summary["mixed_processor_pairs"] == []
    assert f"- processor: {machine}" in (root / "report.md").read_text()
    assert "Warning" not in (root / "report.md").read_text()


def test_study_writes_report_summary_and_every_variant(finished_study):
    root, _ = finished_study
    summary = json.loads((root / "summary.json").read_text())
    cells = {(v["real_fraction"], v["variant"]): v for v in summary["variants"]}
    assert set(cells) == {(0.5, "real"), (0.5, "augment"), (0.5, "paste"), (0.5, "sdm"), (0.5, "sdm_inpaint"),
                          (0.5, "sdm_filtered"), (0.5, "sdm_only"), (1.0, "real"), (1.0, "augment"),
                          (1.0, "paste")}
    assert {cells[(0.5, name)]["generator"] for name in ("real", "augment", "paste", "sdm")} == \
        {"none", "augment", "paste", "sdm"}
    assert cells[(0.5, "real")]["diff"] == 0.0
    for cell in cells.values():
        assert set(cell) >= {"miou_no_bg", "diff", "ci_low", "ci_high", "generator"}
        if cell["variant"] != "real":
            assert cell["ci_low"] <= cell["diff"] <= cell["ci_high"]
    assert cells[(0.5, "sdm_only")]["real_images"] == 0 and cells[(0.5, "sdm_only")]["synthetic_images"] == 4
    assert cells[(0.5, "paste")]["synthetic_images"] == 4
    report = (root / "report.md").read_text()
    for heading in ("## mIoU on the real test split", "## Per-class IoU", "## Label alignment", "## Defect contrast",
                    "## Defect roughness",
                    "## Generator", "## Wall time"):
        assert heading in report
    assert "test command" in report
    # how each generator's images were made, in its kind's words (generators/<kind>.py: note)
    assert "| 50 % | paste | paste | 4 images, real defects pasted (no model) |" in report
    assert "| 50 % | sdm | sdm | 4 images sampled from the SDM, " in report
    assert "| 50 % | sdm_filtered | sdm | " in report and "of their pixels marked ignored by the FreeMask scorer" \
        in report
    for picture in ("paired_differences.png", "generator_loss.png", "grids/r050_sdm.png", "grids/r100_paste.png"):
        assert (root / picture).is_file(), picture
    alignment = {(a["real_fraction"], a["generator"]) for a in summary["label_alignment"]}
    assert alignment == {(0.5, "paste"), (0.5, "sdm"), (0.5, "sdm_inpaint"), (0.5, "sdm_filtered"), (1.0, "paste")}
    assert set(summary["stage_seconds"]) == {"sdm-train", "sdm-finetune", "sample", "filter", "segmenter", "alignment"}
    # defect contrast: the real subset and every generator's images, per fraction, each class but the background
    contrast = {(c["real_fraction"], c["images"]): c for c in summary["defect_contrast"]}
    assert set(contrast) == {(0.5, "real"), (0.5, "paste"), (0.5, "sdm"), (0.5, "sdm_inpaint"),
                             (0.5, "sdm_filtered"), (1.0, "real"), (1.0, "paste")}
    for (_, images), cell in contrast.items():
        # the demo's classes; a generator's entry names the classes it draws off the real contrast
        assert set(cell) == {"real_fraction", "images", "scratch", "spot", "crack"} | (
            set() if images == "real" else {"off_real"})
        assert all(set(cell[name]) == {"mean", "std", "images"} for name in ("scratch", "spot", "crack"))
        assert images == "real" or set(cell["off_real"]) <= {"scratch", "spot", "crack"}
    assert contrast[(0.5, "real")]["scratch"]["images"] > 0
    assert "| 50 % | real subset |" in report
    assert ("Drawn off the real contrast" in report) == any(c.get("off_real") for c in contrast.values())
    # defect roughness: the same sets, every class including the background; alignment names the rougher classes
    roughness = {(c["real_fraction"], c["images"]): c for c in summary["defect_roughness"]}
    assert set(roughness) == set(contrast)
    assert all(set(cell) == {"real_fraction", "images", "background", "scratch", "spot", "crack"}
               for cell in roughness.values())
    assert roughness[(0.5, "real")]["background"]["mean"] > 0
    for a in summary["label_alignment"]:
        assert set(a["rougher_than_real"]) <= {"background", "scratch", "spot", "crack"}


def test_a_filtered_generator_trains_on_the_filtered_labels_of_its_source(finished_study):
    root, _ = finished_study
    entries = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    (filtered,) = [e for e in entries if e["kind"] == "filter"]
    (source,) = [e for e in entries if e["kind"] == "sample" and "/sdm-" in e["run_dir"]]
    assert (Path(filtered["run_dir"]) / "labels_filtered").is_dir()
    assert not (Path(source["run_dir"]) / "labels_filtered").exists(), "the source stays as sampled"
    assert sorted(p.name for p in (Path(filtered["run_dir"]) / "samples").iterdir()) == \
        sorted(p.name for p in (Path(source["run_dir"]) / "samples").iterdir())
    assert list((root / "scorers").iterdir()), "the scorer is cached in the study folder"


def test_the_study_trains_and_scores_each_segmenter_by_the_one_segmenter_run(finished_study, demo_dir):
    """A segmenter unit of the study is `train_and_test` (segmenter/run.py, as evaluate.sh's runs are) with the
    study's options: the weights of the best check on the real validation split, bf16 as the unit records, the
    ignored label 255, synthetic items told apart (none for the real-only variant)."""
    from evaluation.image_sets import load_pairs
    from evaluation.segmenter.model import SegmenterSpec, TrainSettings
    from evaluation.segmenter.run import Scoring, train_and_test
    from guided_diffusion.data import index_dataset

    root, _ = finished_study
    entries = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    [unit] = [e for e in entries if e["kind"] == "segmenter" and (e["fraction"], e["variant"], e["seed"]) ==
              (1.0, "real", 0)]
    split = json.loads((root / "split.json").read_text())
    index = index_dataset(demo_dir, "multi-class", 4, require_test=True)
    by_stem = {pair.stem: pair for pair in index.train}
    real = load_pairs([by_stem[stem] for stem in split["r100"]], "multi-class", 32, "resize", "r100")
    val = load_pairs([by_stem[stem] for stem in split["val"]], "multi-class", 32, "resize", "val")
    test = load_pairs(index.test, "multi-class", 32, "resize", "test")
    bf16 = unit["precision"] == "bf16"
    run = train_and_test(real.images, real.masks.astype(np.uint8), SegmenterSpec("fpn", 4),
                         TrainSettings(steps=4, batch_size=4, augment="flip", seed=0, ignore_index=255, bf16=bf16,
                                       select_every=2),
                         Scoring(4, ignore_index=255, background_class=0, bf16=bf16), validation=val, test=test,
                         synthetic=np.zeros(len(real), bool), progress=False)
    assert (unit["selected_step"], unit["val_miou_no_bg"], unit["final_loss"]) == \
        (run.selection.best_step, run.selection.best_score, run.final_loss)
    assert {k: unit[k] for k in ("miou", "miou_no_bg", "f1")} == {k: run.test.scalars()[k] for k in
                                                                 ("miou", "miou_no_bg", "f1")}


def test_study_trains_the_generator_on_the_subset_only(finished_study):
    root, _ = finished_study
    split = json.loads((root / "split.json").read_text())
    entries = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    (train,) = [e for e in entries if e["kind"] == "sdm-train"]
    config = json.loads((Path(train["run_dir"]) / "config.json").read_text())
    images = sorted(p.stem for p in (root / "data" / "r050" / "train" / "images").iterdir())
    assert config["data_dir"].endswith("data/r050")
    assert images == sorted(split["r050"])
    assert not set(split["r050"]) & set(split["val"])
    assert set(split["r050"]) <= set(split["r100"])


def test_study_resume_redoes_nothing_and_a_change_redoes_only_what_it_touches(finished_study):
    root, values = finished_study
    before = (root / "ledger.jsonl").read_text().splitlines()
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    assert (root / "ledger.jsonl").read_text().splitlines() == before
    changed = {**values, "segmenter": {**values["segmenter"], "steps": 2}}
    run_study(study_from_dict(changed, "test"), changed, log=lambda *_: None, progress=False)
    added = [json.loads(line)["kind"] for line in (root / "ledger.jsonl").read_text().splitlines()[len(before):]]
    # the scorer of the filter trains with the segmenter protocol: the filter is redone too, in its own folder;
    # each real-only segmenter is new, so is its alignment with each generator (4 at 50 %, paste at 100 %)
    assert sorted(added) == ["alignment"] * (2 * 5) + ["filter"] + ["segmenter"] * (10 * 2)


def test_adding_a_seed_or_a_generator_redoes_nothing_already_done(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    values["generators"] = {"paste": values["generators"]["paste"]}
    root = tmp_path / "study"
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    before = (root / "ledger.jsonl").read_text().splitlines()
    more = {**values, "segmenter": {**values["segmenter"], "seeds": [*values["segmenter"]["seeds"], 7]},
            "generators": {**values["generators"], "paste2": {**values["generators"]["paste"], "sample": {
                **values["generators"]["paste"]["sample"], "mask_flip": False}}},
            "variants": [*values["variants"], {"name": "paste2", "synthetic": ["paste2"]}]}
    run_study(study_from_dict(more, "test"), more, log=lambda *_: None, progress=False)
    lines = (root / "ledger.jsonl").read_text().splitlines()
    assert lines[:len(before)] == before
    added = sorted(json.loads(line)["kind"] for line in lines[len(before):])
    # seed 7: real, paste, paste2 and the alignment of its real-only model with both generators; seeds 0 and 1:
    # paste2 and its alignment only; paste2's own sampling once
    assert added == ["alignment"] * (2 + 2) + ["sample"] + ["segmenter"] * (3 + 2)
    summary = json.loads((root / "summary.json").read_text())
    alignment = {a["generator"]: a["seeds"] for a in summary["label_alignment"]}
    assert alignment == {"paste": 3, "paste2": 3}


def test_alignment_retrains_a_real_only_segmenter_whose_weights_are_gone_once_per_seed(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0], variants=[{"name": "real"}])
    values["generators"] = {"paste": values["generators"]["paste"]}
    root = tmp_path / "study"
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    for weights in (root / "segmenters").glob("*.pt"):
        weights.unlink()  # e.g. a study folder copied without its weights
    more = {**values, "generators": {name: {**values["generators"]["paste"], "sample": {
        **values["generators"]["paste"]["sample"], "seed": seed}} for name, seed in (("paste2", 2), ("paste3", 3))}}
    more["variants"] = [{"name": "real"}, {"name": "paste2", "synthetic": ["paste2"]},
                        {"name": "paste3", "synthetic": ["paste3"]}]
    lines = []
    run_study(study_from_dict(more, "test"), more, log=lines.append, progress=False)
    assert sum("is gone: training the real-only segmenter" in line for line in lines) == 2  # seeds 0 and 1
    assert len(list((root / "segmenters").glob("*.pt"))) == 2
    aligned = {a["generator"]: a["seeds"] for a in json.loads((root / "summary.json").read_text())["label_alignment"]}
    assert aligned == {"paste2": 2, "paste3": 2}


def test_report_only_runs_nothing_and_reports_the_finished_units(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    values["generators"] = {"paste": values["generators"]["paste"]}
    root = tmp_path / "study"
    config = study_from_dict(values, "test")
    run_study(config, values, log=lambda *_: None, progress=False, report_only=True)
    assert not (root / "ledger.jsonl").exists()
    assert json.loads((root / "summary.json").read_text())["variants"] == []

    def stop_at_the_paste_segmenters(message: str) -> None:
        if message.startswith("[segmenter]") and "paste" in message:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_study(config, values, log=stop_at_the_paste_segmenters, progress=False)
    before = (root / "ledger.jsonl").read_text()
    run_study(config, values, log=lambda *_: None, progress=False, report_only=True)
    assert (root / "ledger.jsonl").read_text() == before
    summary = json.loads((root / "summary.json").read_text())
    assert [(v["variant"], v["seeds"]) for v in summary["variants"]] == [("real", 2)]


def test_a_report_in_its_report_dir_shows_the_configs_beside_it_read_from_its_own_folder(finished_study,
                                                                                          tmp_path):
    root, values = finished_study
    before = {name: (root / name).read_bytes() for name in ("report.md", "summary.json", "ledger.jsonl")}
    # the same study cut to two variants, whose output_dir is replaced by the study's; and another segmenter
    # protocol (more steps), none of whose segmenters has run
    cut = {**values, "output_dir": str(tmp_path / "not_read"), "variants": values["variants"][:3]}
    other = {**values, "segmenter": {**values["segmenter"], "steps": 6}}
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    (tmp_path / "other.json").write_text(json.dumps(other))
    main = {**values, "report_dir": "with_beside", "beside": [str(tmp_path / "cut.json"), str(tmp_path / "other.json")]}
    run_study(study_from_dict(main, "test"), main, log=lambda *_: None, progress=False, report_only=True)

    assert {name: (root / name).read_bytes() for name in before} == before  # the folder's own report untouched
    report = (root / "with_beside" / "report.md").read_text()
    assert f"## Beside: {tmp_path / 'cut.json'}" in report and f"## Beside: {tmp_path / 'other.json'}" in report
    assert report.split("## Beside: ")[2].count("None of its segmenters is in the ledger yet") == 1
    summary = json.loads((root / "with_beside" / "summary.json").read_text())
    own = {(v["real_fraction"], v["variant"]): v for v in summary["variants"]}
    cut_rows, other_rows = (entry["variants"] for entry in summary["beside"])
    assert {v["variant"] for v in cut_rows} == {"real", "augment", "paste"} and not other_rows
    for row in cut_rows:  # read from the same segmenters, so the same numbers
        assert row == own[(row["real_fraction"], row["variant"])]
    assert summary["beside"][1]["segmenter"]["steps"] == 6
    assert (root / "with_beside" / "results.csv").is_file()


def test_a_config_beside_that_draws_another_split_is_one_line_before_any_work(finished_study, tmp_path):
    root, values = finished_study
    (tmp_path / "draw2.json").write_text(json.dumps({**values, "seed": 7}))
    (tmp_path / "main.json").write_text(json.dumps({**values, "beside": [str(tmp_path / "draw2.json")]}))
    with pytest.raises(ConfigError) as caught:
        load_study(tmp_path / "main.json")
    assert str(caught.value) == (f"{tmp_path / 'main.json'}: key 'beside[0]' {tmp_path / 'draw2.json'} has seed 7 "
                                 "where this study has 0: a config beside it must draw the same split")


def test_a_config_of_another_split_is_refused_in_a_study_folder_whose_subsets_stay_as_they_were(demo_dir,
                                                                                              tmp_path):
    values = study_values(demo_dir, tmp_path / "study")
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False, report_only=True)
    subset = tmp_path / "study" / "data" / "r050" / "train" / "images"
    before = sorted(path.name for path in subset.iterdir())
    redrawn = {**values, "seed": 7}  # another subset of the same dataset into the same folder
    with pytest.raises(ConfigError, match=r"its r050 subset holds \d+ images this config does not draw .*: the "
                                          r"folder belongs to a study of another split"):
        run_study(study_from_dict(redrawn, "test"), redrawn, log=lambda *_: None, progress=False, report_only=True)
    assert sorted(path.name for path in subset.iterdir()) == before


def test_a_killed_study_resumes_after_its_last_finished_unit(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    config = study_from_dict(values, "test")
    calls = []

    def stop_after_first_segmenter(message: str) -> None:
        calls.append(message)
        if message.startswith("[segmenter]") and sum(m.startswith("[segmenter]") for m in calls) == 2:
            raise KeyboardInterrupt  # the second segmenter never finishes
    with pytest.raises(KeyboardInterrupt):
        run_study(config, values, log=stop_after_first_segmenter, progress=False)
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "study" / "ledger.jsonl").read_text().splitlines()]
    assert kinds == ["sample", "segmenter", "alignment"]
    messages = []
    run_study(config, values, log=messages.append, progress=False)
    assert sum(m.startswith("[segmenter]") for m in messages) == 3  # 4 units, 1 done before the kill
    assert not any(m.startswith("[sample]") for m in messages)


def test_a_sample_unit_stopped_mid_way_keeps_the_images_it_wrote(demo_dir, tmp_path, monkeypatch):
    """A session's end or a Slurm time limit during a long sampling unit costs only the batch it cut off."""
    from guided_diffusion.sampling import sample as sample_module

    generator = {"kind": "sdm", "sample": {"mask_split": "all", "num_samples": 4, "batch_size": 2, "sampler": "ddim",
                                           "steps": 2}}
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0], generators={"sdm": generator},
                          variants=[{"name": "real"}, {"name": "sdm", "synthetic": ["sdm"]}])
    config = study_from_dict(values, "test")
    real_batch, batches = sample_module.sample_batch, []

    def stop_at_the_second_batch(job, ids, progress):
        batches.append(ids)
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real_batch(job, ids, progress)
    monkeypatch.setattr(sample_module, "sample_batch", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, values, log=lambda *_: None, progress=False)
    batches.clear()
    run_study(config, values, log=lambda *_: None, progress=False)
    assert batches == [[2, 3]]
    runs = list((tmp_path / "study" / "synthetic").glob("*/sdm-*/sample_*"))
    assert [run.name for run in runs] == ["sample_001"]
    assert json.loads((runs[0] / "summary.json").read_text())["kept_from_stopped_run"] == 2


def test_an_sdm_trained_longer_continues_the_shorter_one_and_ends_with_the_weights_of_a_run_from_scratch(
        demo_dir, tmp_path):
    """Training length is a lever (1x, 2x, 4x): an SDM that differs from another only in train.max_steps continues
    that one's run, so the study trains 4x steps in all instead of 7x, and the estimate counts only the new steps."""
    from guided_diffusion.config import config_from_dict
    from guided_diffusion.train import run_training

    generator = {"kind": "sdm", "sample": {"mask_split": "all", "num_samples": 2, "sampler": "ddim", "steps": 2}}
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          segmenter={"steps": 2, "batch_size": 4, "select_every": 2, "seeds": [0, 1]},
                          generators={"sdm": generator, "sdm_long": {**generator, "sdm": {"train": {"max_steps": 7}}}},
                          variants=[{"name": "real"}, {"name": "sdm", "synthetic": ["sdm"]},
                                    {"name": "sdm_long", "synthetic": ["sdm_long"]}])
    config = study_from_dict(values, "test")
    units = {unit.id: unit for unit in estimate.plan_units(config, 4, SplitSizes(
        val=2, subsets={1.0: 10}, test=4))}
    long = units["sdm-train/r100/sdm_long"]
    assert long.needs == (("shorter", "sdm-train/r100/sdm"),)
    assert [term.count for term in long.terms] == [4]  # 7 steps, the first 3 those of the shorter run
    messages = []
    run_study(config, values, log=messages.append, progress=False)

    entries = {e["unit"]: e for e in map(json.loads, (tmp_path / "study" / "ledger.jsonl").read_text().splitlines())}
    short, continued = entries["sdm-train/r100/sdm"], entries["sdm-train/r100/sdm_long"]
    assert short["steps"] == 3 and continued["steps"] == 7
    assert continued["continued"] == str(Path(short["run_dir"]) / "checkpoints" / "latest.pt")
    assert any(m.startswith("continuing the SDM trained 3 steps (sdm-train/r100/sdm)") for m in messages)

    run_config = json.loads((Path(continued["run_dir"]) / "config.json").read_text())
    scratch_values = {**{k: v for k, v in run_config.items() if k != "resume_checkpoint"},
                      "root_log_dir": str(tmp_path / "scratch"), "auto_resume": False}
    scratch = run_training(config_from_dict("train", scratch_values, "test")[0], "train", log=lambda *_: None)
    assert scratch.state.step == 7
    for name in ("latest.pt", "best.pt"):
        a = torch.load(scratch.run_dir / "checkpoints" / name, weights_only=False)
        b = torch.load(Path(continued["run_dir"]) / "checkpoints" / name, weights_only=False)
        assert a["train_state"] == b["train_state"], name
        for part in ("model", "ema"):
            for key, tensor in a[part].items():
                assert torch.equal(tensor, b[part][key]), (name, part, key)


@pytest.mark.parametrize("change, reason", [
    ({"stop_reason": "patience reached"}, 'it ended with "patience reached", not at its max_steps'),
    ({"precision": "bf16"}, "it ran in bf16, this run in fp32"),
    ({"run_dir": "gone"}, "gone/checkpoints/latest.pt is missing"),
])
def test_an_sdm_trains_from_scratch_where_the_shorter_run_cannot_be_continued_and_says_why(change, reason, tmp_path):
    from evaluation.study.generators.sdm import continued_from

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest.pt").write_bytes(b"")
    messages = []
    study = types.SimpleNamespace(precision=lambda wanted: "fp32", log=messages.append)
    shorter = {"unit": "sdm-train/r025/sdm", "run_dir": str(tmp_path / "run"), "steps": 1500,
               "stop_reason": "max_steps reached", "precision": "fp32"}
    assert continued_from(study, shorter, {"precision": "auto"}) == tmp_path / "run" / "checkpoints" / "latest.pt"
    change = {k: str(tmp_path / v) if k == "run_dir" else v for k, v in change.items()}
    assert continued_from(study, {**shorter, **change}, {"precision": "auto"}) is None
    assert messages[-1] == "training from scratch, not from the shorter run of sdm-train/r025/sdm: " + \
        reason.replace("gone/", str(tmp_path / "gone") + "/")


def test_a_study_resumed_with_its_folder_spelled_another_way_redoes_nothing(demo_dir, tmp_path, monkeypatch):
    """`Results/x`, `./Results/x` and `/abs/.../Results/x` are one study: the subsets' paths in its units'
    fingerprints keep the spelling its ledger recorded. A copy of the folder elsewhere is another study."""
    import shutil

    monkeypatch.chdir(tmp_path)
    values = study_values(demo_dir, "runs/study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)

    def units_run(output_dir) -> list[str]:
        messages = []
        respelled = {**values, "output_dir": str(output_dir)}
        run_study(study_from_dict(respelled, "test"), respelled, log=messages.append, progress=False)
        return [m for m in messages if m.startswith(("[sample]", "[segmenter]"))]

    assert units_run(tmp_path / "runs" / "study") == []
    assert units_run("./runs/../runs/study") == []
    shutil.copytree(tmp_path / "runs" / "study", tmp_path / "copy")
    (tmp_path / "copy" / "report.md").unlink()
    assert units_run(tmp_path / "copy")[0].startswith("[sample] generator paste (paste) at r100")


def test_a_second_run_of_a_study_while_one_runs_is_one_line_and_changes_nothing(demo_dir, tmp_path):
    """Two runs of one study at once would train and sample the same units into the same folders."""
    from evaluation.study.context import StudyLock

    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    (tmp_path / "study").mkdir()
    first = StudyLock(tmp_path / "study")  # the run under way
    with pytest.raises(ConfigError) as info:
        run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    assert str(info.value) == (f"output_dir {tmp_path / 'study'} is in use: another run of this study holds "
                               f"{tmp_path / 'study' / 'study.lock'}; let it end (or stop it) first, or give another "
                               "output_dir")
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["study.lock"]
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False, report_only=True)
    first.release()
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    assert (tmp_path / "study" / "report.md").is_file()


def test_pinning_the_segmenter_precision_keeps_the_units_that_auto_ran_in_it(demo_dir, tmp_path):
    """A study run with precision "auto" on one machine and pinned on a machine of another kind, so that its pairs
    stay in one precision: the units done in the pinned precision are kept, those of the other are redone."""
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    path = tmp_path / "study" / "ledger.jsonl"
    ledger = [json.loads(line) for line in path.read_text().splitlines()]
    [auto_ran] = {entry["precision"] for entry in ledger if entry["kind"] == "segmenter"}  # this machine's
    pinned = {**values, "segmenter": {**values["segmenter"], "precision": auto_ran}}

    def segmenters_run() -> int:
        messages = []
        run_study(study_from_dict(pinned, "test"), pinned, log=messages.append, progress=False)
        return sum(m.startswith("[segmenter]") for m in messages)
    assert segmenters_run() == 0
    # the same units as if "auto" had run them on a machine of the other kind
    other = {"fp32": "bf16", "bf16": "fp32"}[auto_ran]
    path.write_text("".join(json.dumps({**entry, "precision": other} if entry["kind"] == "segmenter" else entry) + "\n"
                            for entry in ledger))
    assert segmenters_run() == 4


def test_ledger_skips_a_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps({"kind": "sample", "fingerprint": "abc", "seconds": 1.0}) + "\n{\"kind\": \"segm")
    assert set(Ledger(path).entries) == {("sample", "abc")}


def test_on_a_cluster_mount_without_locks_the_study_holds_its_folder_unlocked_and_still_records_units(
        tmp_path, monkeypatch):
    """Lustre without the flock mount option answers flock with ENOSYS: the study runs as if nothing else ran."""
    import errno
    import fcntl

    from evaluation.study.context import StudyLock

    def unsupported(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    first, second = StudyLock(tmp_path), StudyLock(tmp_path)  # nothing can tell that another run holds it
    Ledger(tmp_path / "ledger.jsonl").add("sample", "abc", {"unit": "sample/r100/paste"}, 1.0)
    assert set(Ledger(tmp_path / "ledger.jsonl").entries) == {("sample", "abc")}
    first.release()
    second.release()


def test_paired_interval_is_the_student_t_interval():
    mean, low, high = paired_interval([0.01, 0.03, 0.02])
    assert mean == pytest.approx(0.02)
    assert high - mean == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert mean - low == pytest.approx(high - mean)
    assert math.isnan(paired_interval([0.5])[1])


def test_a_verdict_that_data_helps_or_hurts_needs_five_paired_seeds():
    from evaluation.study.report import interval_verdict

    assert interval_verdict(0.018, 0.041, 5) == "helps"
    assert interval_verdict(-0.051, -0.002, 5) == "hurts"
    assert interval_verdict(-0.031, 0.023, 5) == "no clear effect"
    # three seeds whose interval clears 0 lean that way but make no claim (the study's screens run 3 seeds)
    assert interval_verdict(0.008, 0.044, 3) == "leans up (3 seeds; 5 for a claim)"
    assert interval_verdict(-0.044, -0.008, 3) == "leans down (3 seeds; 5 for a claim)"
    assert interval_verdict(-0.065, 0.077, 3) == "no clear effect"
    assert interval_verdict(math.nan, math.nan, 1) == "too few seeds"


def test_the_verdict_line_lists_as_helping_only_variants_with_five_seeds():
    from evaluation.study.report import verdict_lines

    def record(variant: str, diff: float, low: float, high: float, seeds: int, baseline: bool = False) -> dict:
        return {"real_fraction": 0.25, "variant": variant, "generator": "paste" if "paste" in variant else "sdm",
                "diff": diff, "ci_low": low, "ci_high": high, "paired_seeds": seeds, "is_baseline": baseline}

    line, = verdict_lines([record("real", 0.0, math.nan, math.nan, 5, baseline=True),
                           record("sdm_inpaint_balanced", 0.030, 0.018, 0.041, 5),
                           record("paste_sdm_inpaint_balanced", 0.026, 0.008, 0.044, 3)])
    helping = line.split("helps: ")[1].split(";")[0]
    assert "sdm_inpaint_balanced (+3.0)" in helping and "paste_sdm" not in helping
    assert "too few seeds for a claim (fewer than 5), though the interval clears 0: " \
           "paste_sdm_inpaint_balanced (+2.6, 3 seeds)" in line


def test_a_variant_without_the_synthetic_data_keys_keeps_the_fingerprint_of_before_them():
    from evaluation.study.config import Variant

    before = {"name": "paste", "synthetic": ["paste"], "real": True, "augment": "flip", "max_synthetic": 0}
    assert list(Variant(name="paste", synthetic=["paste"]).recipe().items()) == list(before.items())
    assert Variant(name="paste", synthetic=["paste"], synthetic_ratio=0.25).recipe() == {**before,
                                                                                        "synthetic_ratio": 0.25}


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "key 'colour' is unknown"),
    ({"variants": [{"name": "paste", "synthetic": ["paste"]}]}, "has no real-only baseline at real fraction 0.5"),
    ({"variants": [{"name": "real"}, {"name": "x", "synthetic": ["sdn"]}]},
     "names generator 'sdn', which 'generators' does not define (did you mean 'sdm'?)"),
    ({"segmenter": {"seeds": [0]}}, "key 'segmenter.seeds' must be a list of at least two integers"),
    ({"segmenter": {"stpes": 3}}, "key 'segmenter.stpes' is unknown (did you mean 'steps'?)"),
    ({"segmenter": {"encoder_weights": 3}},
     "key 'segmenter.encoder_weights' must be \"imagenet\", a weights file path or null, got 3"),
    ({"segmenter": {"encoder_weights": ""}},
     "key 'segmenter.encoder_weights' must be \"imagenet\", a weights file path or null, got \"\""),
    ({"segmenter": {"encoder_weights": "weights/missing.pt"}},
     "key 'segmenter.encoder_weights' names no file: weights/missing.pt (give \"imagenet\", a weights file path, "
     "or null for random init)"),
    ({"variants": [{"name": "real"}, {"name": "p", "synthetic": ["paste"], "synthetic_ratio": 1.5}]},
     "key 'variants.p.synthetic_ratio' must be a share of each batch in [0, 1] or null (pooled), got 1.5"),
    ({"variants": [{"name": "real"}, {"name": "p", "synthetic": ["paste"], "synthetic_weight": -1}]},
     "key 'variants.p.synthetic_weight' must be >= 0 (1 = as a real image), got -1"),
    ({"variants": [{"name": "real"}, {"name": "p", "synthetic": ["paste"], "real_finetune_share": 1.0}]},
     "key 'variants.p.real_finetune_share' must be in [0, 1) (0 = off), got 1.0"),
    ({"variants": [{"name": "real"}, {"name": "a", "augment": "strong", "real_finetune_share": 0.3}]},
     "key 'variants.a.synthetic_ratio' and synthetic_weight / real_finetune_share tell real from synthetic images"),
    ({"real_fractions": [0.5, 1.5]}, "key 'real_fractions' must be a list of fractions in (0, 1]"),
    ({"report_dir": "../elsewhere"}, "key 'report_dir' must be a folder inside output_dir (a relative path without "
                                     "'..'), got \"../elsewhere\""),
    ({"beside": ["configs/missing.json"]}, "key 'beside[0]' names no file: \"configs/missing.json\""),
    ({"generators": {"p": {"kind": "copy"}}}, "key 'generators.p.kind' must be one of sdm, paste"),
    ({"generators": {"real": {"kind": "paste"}}}, "key 'generators.real' is a reserved name: the report calls the "
                                                  "real subset \"real\" beside the generated sets; rename it"),
    ({"generators": {"f": {"kind": "sdm", "labels": "filtered", "source": "sdn"}}},
     "key 'generators.f.source' must name the generator whose images are filtered"),
    ({"generators": {"s": {"kind": "sdm", "labels": "filtered", "source": "p"}, "p": {"kind": "paste"}}},
     "key 'generators.s.source' must name a generator of raw labels of the same kind (sdm)"),
    ({"generators": {"p": {"kind": "paste", "sdm": {"train": {"lr": 0.1}}}}},
     "key 'generators.p.sdm' only applies to kind sdm, not paste"),
    ({"generators": {"s": {"kind": "sdm", "sdm": {"trian": {"lr": 0.1}}}}},
     "key 'generators.s.sdm.trian' is unknown (did you mean 'train'?)"),
    ({"generators": {"s": {"kind": "sdm", "sdm": {"train": {"data_dir": "x"}}}}},
     "key 'generators.s.sdm.train.data_dir' is set by the study; remove it"),
    ({"generators": {"p": {"kind": "paste", "mask_generator": {}}}},
     "key 'generators.p.mask_generator' only applies to kind sdm, not paste"),
    ({"generators": {"s": {"kind": "sdm", "mask_generator": {"data_dir": "x"}}}},
     "key 'generators.s.mask_generator.data_dir' is set by the study; remove it"),
    ({"variants": [{"name": "real"}, {"name": "paste", "synthetic": ["paste"], "versus": ["pastte"]}]},
     "key 'variants.paste.versus' must name other variants of the study, got 'pastte' (did you mean 'paste'?)"),
    ({"generators": {"p": {"kind": "paste", "sdm_fraction": 0.5}}},
     "key 'generators.p.sdm_fraction' only applies to kind sdm, not paste"),
    ({"generators": {"s": {"kind": "sdm", "sdm_fraction": 0.3}},
      "variants": [{"name": "real"}, {"name": "s", "synthetic": ["s"]}]},
     "key 'generators.s.sdm_fraction' must be one of real_fractions [0.5, 1.0], got 0.3"),
    ({"generators": {"s": {"kind": "sdm", "sdm_fraction": 1.0}},
      "variants": [{"name": "real"}, {"name": "s", "synthetic": ["s"]}]},
     "key 'generators.s.sdm_fraction' is 1.0, but the generator is used at real fraction 0.5: that SDM was "
     "trained on images the smaller subset does not hold"),
])
def test_a_bad_study_key_is_one_line_naming_it(demo_dir, tmp_path, change, message):
    with pytest.raises(ConfigError) as caught:
        study_from_dict(study_values(demo_dir, tmp_path, **change), "study.json")
    assert str(caught.value).startswith("study.json: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_scorer_key_of_a_generators_hardness_args_stops_the_study_before_any_work(demo_dir, tmp_path,
                                                                                         capsys):
    values = study_values(demo_dir, tmp_path / "study")
    values["generators"]["sdm"]["sample"]["hardness_args"] = {"scorer": {"batch_size": 1}}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    assert study_main(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: study generators.sdm: key 'hardness_args.scorer.batch_size' must be at least 2 (batch " \
                  "norm needs two images), got 1"
    assert not (tmp_path / "study").exists()


def test_a_bad_sample_key_of_a_generator_stops_the_study_before_any_work(demo_dir, tmp_path, capsys):
    values = study_values(demo_dir, tmp_path / "study")
    values["generators"]["sdm"]["sample"]["sampler"] = "euler"
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    assert study_main(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study generators.sdm: key 'sampler' must be one of") and "\n" not in err
    assert not (tmp_path / "study").exists()


def test_paste_and_inpaint_without_defect_free_images_stop_the_study_before_any_work(tmp_path, capsys):
    from guided_diffusion.demo import make_demo_dataset
    data = make_demo_dataset(tmp_path / "demo", num_train=6, num_test=2, image_size=32)
    for mask in (data / "train" / "masks").iterdir():  # give every image a defect pixel
        from PIL import Image
        pixels = np.array(Image.open(mask))
        pixels[0, 0] = 1
        Image.fromarray(pixels).save(mask)
    values = study_values(data, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]}])
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    assert study_main(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: key 'generators.paste': mode 'paste' puts defects onto defect-free images, but "
                          "none of the ") and "\n" not in err
    assert err.endswith("configs/experiment_magnetic_tile_from_masks.json is a study that needs none")
    assert not (tmp_path / "study").exists()


def test_background_class_out_of_range_and_ignore_index_on_a_class_are_refused(demo_dir, tmp_path, capsys):
    for change, message in (({"background_class": 7}, "key 'background_class' is 7 but the dataset has 4 classes"),
                            ({"ignore_index": 2}, "key 'ignore_index' 2 is a class id")):
        path = tmp_path / "study.json"
        path.write_text(json.dumps(study_values(demo_dir, tmp_path / "study", **change)))
        assert study_main(["-c", str(path), "--dry-run"]) == 2
        assert message in capsys.readouterr().err


def test_quick_keeps_every_stage_at_toy_size(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "s", image_size=128,
                          segmenter={"steps": 1000, "seeds": [0, 1, 2, 3, 4]})
    config = study_from_dict(values, "test", quick=True)
    assert config.image_size == 32 and config.segmenter.steps == 30 and config.segmenter.seeds == [0, 1]
    assert [v.name for v in config.variants] == [v["name"] for v in values["variants"]]
    assert config.sdm["train"]["max_steps"] == 12
    assert all(g.sample["num_samples"] == 8 for g in config.generators.values() if g.labels == "raw")


def test_quick_keeps_the_encoder_that_encoder_weights_are_for(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "s", segmenter={"encoder": "tu-tf_efficientnet_lite0",
                                                               "encoder_weights": "imagenet", "seeds": [0, 1]})
    config = study_from_dict(values, "test", quick=True)
    assert (config.segmenter.encoder, config.segmenter.encoder_weights) == ("tu-tf_efficientnet_lite0", "imagenet")
    values["segmenter"]["encoder_weights"] = None
    assert study_from_dict(values, "test", quick=True).segmenter.encoder == "resnet18"


def test_encoder_weights_null_leaves_the_segmenter_fingerprint_keys_as_before_the_key():
    before = {"architecture": "fpn", "encoder": "resnet18", "steps": 1000, "batch_size": 8, "lr": 1e-3,
              "weight_decay": 1e-4, "select_every": 100, "precision": "auto"}  # the protocol, seeds left out
    assert list(SegmenterProtocol().fingerprint_keys().items()) == list(before.items())
    assert SegmenterProtocol(encoder_weights="imagenet").fingerprint_keys() == {**before,
                                                                                "encoder_weights": "imagenet"}


PINNED_KEYS = Path(__file__).resolve().parent / "fixtures" / "study_fingerprints.json"


def unit_name(kind: str, where: tuple) -> str:
    """A unit as tests/fixtures/study_fingerprints.json names it: 'segmenter r025 real seed 0', 'sdm-train r025'."""
    from evaluation.study.units import fraction_tag

    if kind in ("sdm-train", "sdm-finetune"):
        return f"{kind} {fraction_tag(where[0])}"  # where[1] is the SDM's first generator, one SDM in these configs
    return f"{kind} {fraction_tag(where[0])} {where[1]}" + (f" seed {where[2]}" if len(where) > 2 else "")


def unit_keys_of(name: str, quick: bool, tmp_path: Path, monkeypatch) -> dict[str, str]:
    """The key of every unit the study of configs/<name> meets, by unit name, with no work done: it runs from a
    folder laid out as the repository (its data_dir ../shared/... and output_dir Results/... are read as they are,
    and are part of some keys); each unit is recorded and answered with the ledger entry of a first run instead of
    run (its run folder is part of later units' keys), each generator's images are two blank stand-ins, and no
    report is written."""
    from evaluation.image_sets import ImageSet
    from evaluation.study import report as study_report, run as study_run
    from evaluation.study.config import load_study
    from evaluation.study.context import Study
    from evaluation.study.units import fraction_tag

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "shared").symlink_to((repo.parent / "shared").resolve(), target_is_directory=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    keys: dict[str, str] = {}

    def record(study, unit, key, what, work):
        kind, where = unit.kind, unit.where
        name, tag = unit_name(kind, where), fraction_tag(where[0])
        assert name not in keys, name
        keys[name] = key
        # the run folder a first run makes (later keys hold it): <root_log_dir>/<action>_001
        folders = {"sdm-train": f"generator/{tag}/{key}/train_001",
                   "sdm-finetune": f"generator/{tag}/{keys.get(f'sdm-train {tag}')}/finetune_001",
                   "sample": f"synthetic/{tag}/{where[1]}-{key}/sample_001",
                   "filter": f"synthetic/{tag}/{where[1]}-{key}/sample_001"}
        return {"kind": kind, "fingerprint": key, "seconds": 0.0,
                "run_dir": str(study.root / folders[kind]) if kind in folders else ""}

    def blank(study, generator, run_dir):
        side = study.config.image_size
        return ImageSet(generator, ("a", "b"), np.zeros((2, side, side, 3), np.uint8),
                        np.zeros((2, side, side), np.uint8))

    monkeypatch.setattr(Study, "unit", record)
    monkeypatch.setattr(study_run, "load_generated", blank)
    monkeypatch.setattr(study_report, "write_report", lambda *args, **kwargs: None)
    config, values = load_study(repo / "configs" / name, [], quick)
    run_study(config, values, "pinned keys", log=lambda *_: None, progress=False)
    return keys


@pytest.mark.parametrize("name, quick", [("experiment_magnetic_tile.json", False),
                                         ("experiment_magnetic_tile.json", True),
                                         ("experiment_magnetic_tile_from_masks.json", False),
                                         ("experiment_magnetic_tile_from_masks.json", True),
                                         ("experiment_magnetic_tile_round_one.json", False),
                                         ("experiment_magnetic_tile_round_one.json", True),
                                         ("experiment_magnetic_tile_full.json", False),
                                         ("experiment_magnetic_tile_full.json", True)])
def test_the_committed_study_configs_key_their_units_as_before_so_their_folders_resume(name, quick, tmp_path,
                                                                                      monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    if not (repo / json.loads((repo / "configs" / name).read_text())["data_dir"]).is_dir():
        pytest.skip("the magnetic-tile dataset is not on this machine")
    pinned = json.loads(PINNED_KEYS.read_text(encoding="utf-8"))[name + (" --quick" if quick else "")]
    assert unit_keys_of(name, quick, tmp_path, monkeypatch) == pinned


def test_without_background_class_the_no_bg_mean_is_the_mean_over_every_class():
    from evaluation.segmenter.metrics import segmentation_metrics
    target = np.array([[[0, 0, 1, 1]]])
    predicted = np.array([[[0, 1, 1, 1]]])
    with_bg = segmentation_metrics(predicted, target, 2)
    none = segmentation_metrics(predicted, target, 2, background_class=None)
    other = segmentation_metrics(predicted, target, 2, background_class=1)
    assert with_bg.miou_no_bg == pytest.approx(2 / 3)  # class 1 alone
    assert none.miou_no_bg == pytest.approx(none.miou)
    assert other.miou_no_bg == pytest.approx(1 / 2)  # class 0 alone


def test_label_alignment_sits_beside_the_real_test_score_of_the_same_seeds():
    """A generator aligned on fewer seeds than the baseline has (one added later) is compared with the real test
    score of those seeds only; seeds whose masks hold no scored class (NaN) are left out without a warning."""
    import warnings
    from evaluation.study.report import _alignment
    SimpleNamespace = types.SimpleNamespace
    study = SimpleNamespace(config=SimpleNamespace(real_fractions=[0.5], generators={
        "old": SimpleNamespace(kind="sdm"), "new": SimpleNamespace(kind="paste")}))
    rows = [{"fraction": 0.5, "miou_no_bg": 0.2, "alignment": {"old": {"miou_no_bg": 0.1}}},
            {"fraction": 0.5, "miou_no_bg": 0.4, "alignment": {"old": {"miou_no_bg": 0.3},
                                                              "new": {"miou_no_bg": float("nan")}}},
            {"fraction": 0.5, "miou_no_bg": 0.6, "alignment": {"old": {"miou_no_bg": 0.5},
                                                              "new": {"miou_no_bg": 0.7}}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aligned = {a["generator"]: a for a in _alignment(study, rows)}
    assert aligned["old"]["alignment_miou_no_bg"] == pytest.approx(0.3)
    assert aligned["old"]["real_test_miou_no_bg"] == pytest.approx(0.4) and aligned["old"]["seeds"] == 3
    assert aligned["new"]["alignment_miou_no_bg"] == pytest.approx(0.7)
    assert aligned["new"]["real_test_miou_no_bg"] == pytest.approx(0.5) and aligned["new"]["seeds"] == 2
    rows[2]["alignment"]["new"]["miou_no_bg"] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(next(a for a in _alignment(study, rows) if a["generator"] == "new")["alignment_miou_no_bg"])


def test_label_alignment_names_the_classes_a_generator_draws_far_rougher_than_the_real_subset():
    """Pixel noise is easy for a segmenter to find: the alignment table names such classes beside the score."""
    from evaluation.contrast import ClassStat, ImageSetLook
    from evaluation.study.report import _rougher
    study = types.SimpleNamespace(class_names=["background", "spot", "crack"])

    def look(*roughness: float) -> ImageSetLook:
        return ImageSetLook({}, {c: ClassStat(r, 0.0, 0 if math.isnan(r) else 1) for c, r in enumerate(roughness)})

    looks = {0.5: {"real": look(2.0, 6.0, 5.0), "noisy": look(2.5, 30.0, float("nan")),
                   "smooth": look(4.0, 12.0, 9.0)}}
    assert _rougher(study, looks, 0.5, "noisy") == ["spot"]  # crack not drawn: not compared
    assert _rougher(study, looks, 0.5, "smooth") == []  # twice as rough is not more than twice
    assert _rougher(study, looks, 0.5, "other") is None and _rougher(study, looks, 1.0, "noisy") is None


def test_the_report_names_the_classes_a_generator_draws_off_the_real_contrast():
    """A class whose mean contrast lies further from the real mean than the real images' spread is named, with
    both means: on the second draw the SDM's blowholes were -95.6 against the real -56.0 ± 23.6."""
    from evaluation.contrast import ClassStat, ImageSetLook
    from evaluation.study.report import _contrast_off, _contrast_off_lines
    study = types.SimpleNamespace(class_names=["background", "blowhole", "break", "fray"])

    def look(*stats: tuple[float, float, int]) -> ImageSetLook:
        return ImageSetLook({c + 1: ClassStat(*stat) for c, stat in enumerate(stats)}, {})

    real = look((-56.0, 23.6, 17), (-15.3, 13.5, 15), (-24.8, 0.0, 1))
    looks = {0.25: {"real": real, "sdm": look((-95.6, 30.7, 26), (-10.8, 14.3, 25), (-60.0, 5.0, 7)),
                    "faint": look((-20.0, 5.0, 9), (float("nan"), float("nan"), 0), (-24.8, 0.0, 3))},
             1.0: {"real": real, "same": look((-56.0, 1.0, 3), (-28.8, 2.0, 4), (-24.8, 1.0, 2))}}
    # fray is in 1 real image: no spread to compare against; break 4.5 from the real mean is within 13.5
    assert _contrast_off(study, looks, 0.25, "sdm") == ["blowhole"]
    assert _contrast_off(study, looks, 0.25, "faint") == ["blowhole"]  # break not drawn: not compared
    assert _contrast_off(study, looks, 1.0, "same") == []  # 13.5 away is not further than 13.5
    assert _contrast_off(study, looks, 0.25, "real") is None and _contrast_off(study, looks, 0.5, "sdm") is None
    lines = _contrast_off_lines(study, looks)
    assert "- 25 % sdm: blowhole (-95.6 against -56.0 ± 23.6)" in lines
    assert "- 25 % faint: blowhole (-20.0 against -56.0 ± 23.6)" in lines and len(lines) == 5
    assert _contrast_off_lines(study, {1.0: looks[1.0]})[0].startswith("No generator draws a class further")


def test_the_sdm_share_pairs_each_sdm_variant_with_itself_without_the_sdm(finished_study, demo_dir, tmp_path):
    root, _ = finished_study
    summary = json.loads((root / "summary.json").read_text())
    cells = {(v["real_fraction"], v["variant"]): v for v in summary["variants"]}
    sdm = cells[(0.5, "sdm")]
    assert sdm["without_sdm"] == "real" and sdm["sdm_diff"] == pytest.approx(sdm["diff"])
    assert "without_sdm" not in cells[(0.5, "sdm_only")]  # no real images: nothing to pair it with
    assert "without_sdm" not in cells[(0.5, "paste")]
    assert "### What the SDM adds" in (root / "report.md").read_text()

    values = study_values(demo_dir, tmp_path / "s")
    values["variants"] += [{"name": "paste+sdm", "synthetic": ["sdm", "paste"]},
                           {"name": "paste+inpaint", "synthetic": ["paste", "sdm_inpaint"], "augment": "strong"}]
    config = study_from_dict(values, "test")
    study = types.SimpleNamespace(config=config)
    variants = {v.name: v for v in config.variants}
    assert without_sdm(study, variants["paste+sdm"], 0.5) == "paste"
    assert without_sdm(study, variants["paste+inpaint"], 0.5) is None  # no strong-augmented paste variant
    assert without_sdm(study, variants["paste"], 0.5) is None


def test_one_sdm_serves_every_fraction_with_sdm_fraction(demo_dir, tmp_path):
    """sdm_fraction 0.5: the SDM is trained once, on the 50 % subset, and paints into the 100 % subset's
    tiles too (the subsets are nested, so it never saw an image the 100 % subset lacks)."""
    values = study_values(demo_dir, tmp_path / "study",
                          variants=[{"name": "real"}, {"name": "sdm_inpaint", "synthetic": ["sdm_inpaint"]}])
    values["generators"] = {"sdm_inpaint": {**values["generators"]["sdm_inpaint"], "sdm_fraction": 0.5}}
    root = run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    entries = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    (trained,) = [e for e in entries if e["kind"] == "sdm-train"]
    assert "/generator/r050/" in trained["run_dir"]
    samples = {Path(e["run_dir"]).parts[-3]: e for e in entries if e["kind"] == "sample"}
    assert set(samples) == {"r050", "r100"}
    for tag, sample in samples.items():
        config = json.loads((Path(sample["run_dir"]) / "config.json").read_text())
        assert "/generator/r050/" in config["model_path"]
        assert config["data_dir"].endswith(f"data/{tag}"), "masks and tiles come from the fraction's own subset"
    summary = json.loads((root / "summary.json").read_text())
    assert {(v["real_fraction"], v["variant"]) for v in summary["variants"]} == \
        {(0.5, "real"), (0.5, "sdm_inpaint"), (1.0, "real"), (1.0, "sdm_inpaint")}
    assert "sdm_inpaint at every fraction from 50 % up samples the SDM trained on the 50 % subset" in \
        (root / "report.md").read_text()
    # the same study with sdm_inpaint at 50 % only, then at both again: `fractions` says where a variant runs,
    # not what its segmenters are, so nothing is trained twice
    before = (root / "ledger.jsonl").read_text().splitlines()
    narrow = {**values, "variants": [{"name": "real"},
                                     {"name": "sdm_inpaint", "synthetic": ["sdm_inpaint"], "fractions": [0.5]}]}
    run_study(study_from_dict(narrow, "test"), narrow, log=lambda *_: None, progress=False)
    assert (root / "ledger.jsonl").read_text().splitlines() == before


def test_a_generator_can_change_the_sdm_keys_for_a_lever_ablation(demo_dir, tmp_path, capsys):
    """generators.<name>.sdm changes keys of the study's SDM for that generator alone: it trains an SDM of its
    own (the other generators share the study's), and a bad changed key stops the study in one line."""
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "sdm", "synthetic": ["sdm"]},
                                    {"name": "no_min_snr", "synthetic": ["no_min_snr"], "versus": ["sdm"]},
                                    {"name": "sdm_inpaint", "synthetic": ["sdm_inpaint"]}])
    sample = values["generators"]["sdm"]["sample"]
    values["generators"] = {"sdm": values["generators"]["sdm"], "sdm_inpaint": values["generators"]["sdm_inpaint"],
                            "no_min_snr": {"kind": "sdm", "sample": sample,
                                           "sdm": {"train": {"min_snr_gamma": 0.0, "lr": 2e-4}, "finetune": None}}}
    values["sdm"]["train"]["min_snr_gamma"] = 5.0
    config = study_from_dict(values, "test")
    assert config.sdm_settings("no_min_snr")["train"]["max_steps"] == 3  # the study's keys stay where not changed
    assert config.sdm_settings("no_min_snr")["finetune"] is None
    assert config.sdm_settings("sdm") == values["sdm"]
    root = run_study(config, values, log=lambda *_: None, progress=False)
    entries = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    trained = [json.loads((Path(e["run_dir"]) / "config.json").read_text()) for e in entries
               if e["kind"] == "sdm-train"]
    (lever, default) = sorted(trained, key=lambda c: c["min_snr_gamma"])
    assert (lever["min_snr_gamma"], lever["lr"]) == (0.0, 2e-4)
    assert default["min_snr_gamma"] == 5.0 and default["lr"] != 2e-4
    assert len([e for e in entries if e["kind"] == "sdm-finetune"]) == 1, "no_min_snr is not finetuned"
    report = (root / "report.md").read_text()
    assert 'no_min_snr samples an SDM of its own: the study\'s `sdm` with `{"train": {"min_snr_gamma": 0.0' in report
    summary = json.loads((root / "summary.json").read_text())
    assert {a["generator"] for a in summary["label_alignment"]} == {"sdm", "sdm_inpaint", "no_min_snr"}
    # the lever's variant is paired with the default SDM's, seed by seed ("Against other variants")
    cells = {v["variant"]: v for v in summary["variants"]}
    (versus,) = cells["no_min_snr"]["versus"]
    assert versus["variant"] == "sdm" and versus["seeds"] == 2
    assert versus["diff"] == pytest.approx(cells["no_min_snr"]["diff"] - cells["sdm"]["diff"])
    assert "### Against other variants" in report and "| 100 % | no_min_snr | sdm |" in report

    values["generators"]["no_min_snr"]["sdm"]["train"]["min_snr_gama"] = 1.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**values, "output_dir": str(tmp_path / "bad")}))
    assert study_main(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: study generators.no_min_snr.sdm.train: unknown key 'min_snr_gama'"), err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs")
                                        .glob("experiment_*.json")))
def test_the_shipped_study_configs_pass_their_dry_run(name, monkeypatch, capsys):
    repo = Path(__file__).resolve().parents[1]
    values = json.loads((repo / "configs" / name).read_text())
    if not (repo / values["data_dir"]).is_dir():
        pytest.skip(f"{values['data_dir']} is not on this machine")
    monkeypatch.chdir(repo)
    assert study_main(["-c", f"configs/{name}", "--dry-run"]) == 0, capsys.readouterr().err


def test_a_generator_with_a_mask_generator_paints_new_masks_learned_from_the_subset(demo_dir, tmp_path, capsys):
    """mask_generator: the study trains `main.py masks` on the subset's masks, and the SDM paints images for the
    new masks it samples (new layouts, not the subset's masks)."""
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[0.5],
                          variants=[{"name": "real"}, {"name": "sdm_new_masks", "synthetic": ["sdm_new_masks"]}])
    values["generators"] = {"sdm_new_masks": {
        "kind": "sdm", "sample": {"num_samples": 4, "sampler": "ddim", "steps": 2, "mask_steps": 2},
        "mask_generator": {"image_size": 16, "channel_mult": "1,2", "max_steps": 2, "batch_size": 4,
                           "save_interval": 2}}}
    root = run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    entries = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    (masks,) = [e for e in entries if e["kind"] == "masks-train"]
    masks_config = json.loads((Path(masks["run_dir"]) / "config.json").read_text())
    assert masks_config["data_dir"].endswith("data/r050") and masks_config["image_size"] == 16
    (sample,) = [e for e in entries if e["kind"] == "sample"]
    sample_dir = Path(sample["run_dir"])
    assert json.loads((sample_dir / "config.json").read_text())["mask_source"] == masks["run_dir"]
    assert not list((sample_dir / "images").glob("*.png")), "a new mask has no real image"
    assert len(list((sample_dir / "labels").iterdir())) == 4
    summary = json.loads((root / "summary.json").read_text())
    assert {(v["variant"], v["synthetic_images"]) for v in summary["variants"]} == {("real", 0), ("sdm_new_masks", 4)}
    assert "masks-train" in summary["stage_seconds"]
    before = (root / "ledger.jsonl").read_text()
    run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    assert (root / "ledger.jsonl").read_text() == before, "resumed: nothing is trained again"

    values["generators"]["sdm_new_masks"]["mask_generator"]["max_stpes"] = 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**values, "output_dir": str(tmp_path / "bad")}))
    assert study_main(["-c", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: study generators.sdm_new_masks.mask_generator: unknown key 'max_stpes'"), err


class FixedTimings:
    """Per-step seconds chosen by the test, so the estimate's arithmetic can be checked exactly. A forward call
    costs 0.5 s an image for an SDM and 0.25 s for a mask generator, twice that per image from 8 images a call up
    (as a CPU slows per image at larger batches); the rows asked for are recorded."""

    def __init__(self):
        self.forward_calls = set()

    def sdm(self, values):
        return ModelCosts(train_step=2.0, finetune_step=3.0)

    def masks(self, values):
        return ModelCosts(train_step=1.0, finetune_step=0.0)

    def forward(self, action, values, rows):
        self.forward_calls.add((action, rows))
        return {"train": 0.5, "masks": 0.25}[action] * rows * (2 if rows >= 8 else 1)

    def segmenter(self):
        return SegmenterCosts(train_step=0.1, predict_image=0.01)


def test_the_estimate_counts_every_unit_of_the_study_at_the_timed_costs(demo_dir, tmp_path):
    """--estimate's table: each stage is its runs x (steps, sampled forwards, predicted images) x the timed
    seconds; guidance doubles a step's forwards and the rows of each network call (timed at those rows), a filter
    adds its scorer, label alignment segments every generated image once per seed."""
    values = study_values(demo_dir, tmp_path / "study")
    values["generators"]["sdm"]["sample"]["s"] = 2.0  # ddim, 2 steps, guided: 4 forwards an image
    values["generators"]["sdm_inpaint"]["sample"]["s"] = 1.0  # 2 steps, unguided: 2 forwards
    config = study_from_dict(values, "test")
    sizes = SplitSizes(val=3, subsets={0.5: 4, 1.0: 8}, test=2)
    timings = FixedTimings()
    stages = {stage.name: stage for stage in plan_study(config, 4, sizes, timings)}
    # 4 images a call (sample batch 8, 4 images): 8 rows where guided
    assert timings.forward_calls == {("train", 4), ("train", 8)}

    segmenter = 4 * 0.1 + (2 * 3 + 2) * 0.01  # 4 steps, checks at steps 2 and 4 on 3 val images, 2 test images
    assert stages == {
        "SDM training (r050, as sdm)": Stage("SDM training (r050, as sdm)", 1, "3 steps of batch 4 at 32 px", 6.0),
        "SDM finetuning (r050, as sdm)": Stage("SDM finetuning (r050, as sdm)", 1, "2 steps of batch 4", 6.0),
        # 2 calls an image of 8 rows at 1 s a row: 4 images x 2 x 8 s / 4
        "generator sdm (r050)": Stage("generator sdm (r050)", 1, "4 images x 4 forwards at 32 px", 16.0),
        "FreeMask filter sdm_filtered (r050)": Stage("FreeMask filter sdm_filtered (r050)", 1,
                                                     "a scorer of 4 steps + 4 images segmented",
                                                     pytest.approx(0.4 + 0.04)),
        "generator sdm_inpaint (r050)": Stage("generator sdm_inpaint (r050)", 1, "4 images x 2 forwards at 32 px",
                                              4.0),
        "generator paste (r050)": Stage("generator paste (r050)", 1, "4 images, no model", 0.0),
        "segmenters (r050)": Stage("segmenters (r050)", 7 * 2, "4 steps of batch 4 + 2 checks on 3 val images + "
                                                               "2 test images", pytest.approx(segmenter)),
        **{f"label alignment of {name} (r050)": Stage(f"label alignment of {name} (r050)", 2,
                                                      "4 generated images segmented", pytest.approx(0.04))
           for name in ("sdm", "sdm_filtered", "paste", "sdm_inpaint")},
        "generator paste (r100)": Stage("generator paste (r100)", 1, "4 images, no model", 0.0),
        "segmenters (r100)": Stage("segmenters (r100)", 3 * 2, "4 steps of batch 4 + 2 checks on 3 val images + "
                                                               "2 test images", pytest.approx(segmenter)),
        "label alignment of paste (r100)": Stage("label alignment of paste (r100)", 2, "4 generated images segmented",
                                                 pytest.approx(0.04)),
    }
    total = sum(stage.total for stage in stages.values())
    assert total == pytest.approx(6 + 6 + 16 + 0.44 + 4 + 20 * segmenter + 2 * 4 * 0.04 + 2 * 0.04)
    table = format_estimate(list(stages.values()), "a test machine")
    assert f"| **total** | | | | **{format_duration(total)}** |" in table


def test_the_estimate_with_jobs_lays_out_the_same_units_at_the_same_costs(demo_dir, tmp_path):
    """One job takes the table's total; two take less, but no less than half of it nor than the SDM's chain
    (train, finetune, sample, then a segmenter on its images)."""
    config = study_from_dict(study_values(demo_dir, tmp_path / "study"), "test")
    sizes = SplitSizes(val=3, subsets={0.5: 4, 1.0: 8}, test=2)
    total = sum(stage.total for stage in plan_study(config, 4, sizes, FixedTimings()))
    assert estimate.jobs_wall_time(config, 4, sizes, FixedTimings(), 1) == pytest.approx(total)
    two = estimate.jobs_wall_time(config, 4, sizes, FixedTimings(), 2)
    segmenter = 4 * 0.1 + (2 * 3 + 2) * 0.01
    assert max(total / 2, 6 + 6 + 16 + segmenter) <= two < total


def test_the_estimate_counts_the_mask_generator_of_a_generator_that_paints_new_masks(demo_dir, tmp_path):
    values = study_values(demo_dir, tmp_path / "study", real_fractions=[0.5],
                          variants=[{"name": "real"}, {"name": "new", "synthetic": ["new"]}])
    values["generators"] = {"new": {
        "kind": "sdm", "sample": {"num_samples": 4, "sampler": "ddim", "steps": 2, "s": 1.0, "mask_steps": 5,
                                  "mask_guidance": 2.0},
        "mask_generator": {"image_size": 16, "channel_mult": "1,2", "max_steps": 7, "batch_size": 4}}}
    timings = FixedTimings()
    stages = {s.name: s for s in plan_study(study_from_dict(values, "test"), 4, SplitSizes(3, {0.5: 4}, 2), timings)}
    assert stages["mask generator of new (r050)"] == Stage("mask generator of new (r050)", 1,
                                                           "7 steps of batch 4 at 16 px", 7.0)
    # 5 guided calls a mask, each of 2 x 4 rows at 0.5 s a row
    assert stages["new masks for new (r050)"] == Stage("new masks for new (r050)", 1, "4 masks x 10 forwards",
                                                       4 * 5 * 8 * 0.5 / 4)
    assert ("masks", 8) in timings.forward_calls


@pytest.mark.parametrize("warm_up, least, call_seconds, calls", [
    (True, 1, 0.5, 1 + 4), (True, 1, 3.0, 1 + 1), (False, 1, 0.5, 4), (False, 1, 3.0, 1), (True, 3, 3.0, 1 + 3)])
def test_a_timing_calls_until_its_budget_is_spent_after_an_optional_warm_up(monkeypatch, warm_up, least,
                                                                            call_seconds, calls):
    """Calls until the 2 s budget is spent (at least `least`), after an untimed warm-up call unless `warm_up` is
    off: then a call longer than the budget (a large forward batch) runs only once."""
    clock, made = [0.0], []

    def work():
        made.append(1)
        clock[0] += call_seconds

    monkeypatch.setattr(estimate.time, "perf_counter", lambda: clock[0])
    assert estimate.seconds_per_call(work, budget=2.0, warm_up=warm_up, least=least) == call_seconds
    assert len(made) == calls


def test_estimate_times_the_models_here_and_writes_nothing_into_the_study_folder(demo_dir, tmp_path, capsys):
    values = study_values(demo_dir, tmp_path / "study")
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    assert study_main(["-c", str(path), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "estimated wall time on this machine (cpu, " in out
    for stage in ("SDM training (r050, as sdm)", "generator sdm (r050)", "FreeMask filter sdm_filtered (r050)",
                  "segmenters (r100)", "**total**"):
        assert f"| {stage} |" in out, stage
    minutes = [line.split("|")[5].strip() for line in out.splitlines() if line.startswith("| segmenters (r050)")]
    assert minutes and minutes[0] not in ("", "0 s"), "a segmenter's time was measured, not left at zero"
    assert not (tmp_path / "study").exists()


def test_a_scene_dataset_with_no_background_class_and_a_void_id_runs_the_whole_study(tmp_path):
    """What the product will meet on data nobody here has seen: RGB, non-square images, class 0 a real class
    (background_class null: "without background" averages every class) and void pixels (ignore_index 255, which
    the SDM and the segmenters skip and the scores leave out)."""
    data = make_scene_dataset(tmp_path / "scenes")
    values = study_values(data, tmp_path / "study", num_classes=5, background_class=None, ignore_index=255,
                          real_fractions=[0.5, 1.0])
    values["generators"] = {"sdm": values["generators"]["sdm"]}
    values["variants"] = [{"name": "real"}, {"name": "augment", "augment": "strong"},
                          {"name": "sdm", "synthetic": ["sdm"], "fractions": [0.5]},
                          {"name": "sdm_only", "synthetic": ["sdm"], "real": False, "fractions": [0.5]}]
    root = run_study(study_from_dict(values, "test"), values, log=lambda *_: None, progress=False)
    summary = json.loads((root / "summary.json").read_text())
    rows = {(v["variant"], v["real_fraction"]): v for v in summary["variants"]}
    assert set(rows) == {("real", 0.5), ("augment", 0.5), ("sdm", 0.5), ("sdm_only", 0.5), ("real", 1.0),
                         ("augment", 1.0)}
    units = [json.loads(line) for line in (root / "ledger.jsonl").read_text().splitlines()]
    segmenters = [u for u in units if u["kind"] == "segmenter"]
    assert len(segmenters) == 6 * 2
    for unit in segmenters:  # without a background class the no-background mean is the mean over all 5 classes
        assert len([key for key in unit if key.startswith("iou_")]) == 5
        assert unit["miou_no_bg"] == pytest.approx(unit["miou"])
    (sample,) = [u for u in units if u["kind"] == "sample"]
    sample_dir = Path(sample["run_dir"])
    assert json.loads((sample_dir / "config.json").read_text())["ignore_index"] == 255
    from PIL import Image
    label_files = sorted((sample_dir / "labels").iterdir())
    assert len(label_files) == 4
    for path in label_files:  # the void line of each dataset mask is kept in the written label, and white
        label = np.array(Image.open(path))
        assert (label == 255).any() and set(np.unique(label)) <= {0, 1, 2, 3, 4, 255}
        colored = np.array(Image.open(sample_dir / "colored_labels" / path.name))
        assert (colored[label == 255] == 255).all()
    report = (root / "report.md").read_text()
    assert "sdm" in report and "real" in report


@pytest.mark.parametrize("generator, message", [
    ({"kind": "sdm", "labels": "filtered", "source": "sdm", "filter": {}},
     "error: key 'generators.sdm_filtered': FreeMask filtering does not handle void pixels yet "
     "(ignore_index 255); leave out the filtered generator"),
    ({"kind": "sdm", "sample": {"num_samples": 4, "mask_steps": 2},
      "mask_generator": {"image_size": 16, "channel_mult": "1,2", "max_steps": 2}},
     "key 'ignore_index' is 255, but the mask generator has no void class"),
])
def test_with_void_pixels_the_generators_that_cannot_handle_them_stop_the_study_first(tmp_path, capsys, generator,
                                                                                      message):
    data = make_scene_dataset(tmp_path / "scenes", num_train=4, num_test=2)
    values = study_values(data, tmp_path / "study", num_classes=5, background_class=None, ignore_index=255,
                          real_fractions=[1.0], variants=[{"name": "real"},
                                                          {"name": "other", "synthetic": ["sdm_filtered"]}])
    values["generators"] = {"sdm": values["generators"]["sdm"], "sdm_filtered": generator}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    assert study_main(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "study").exists()


def test_an_sdm_of_isdms_best_epoch_rule_keeps_its_fingerprint_and_one_of_the_new_default_does_not():
    from evaluation.study.generators.sdm import with_best_epoch_rule

    values = {"lr": 1e-4, "max_steps": 1500}
    assert with_best_epoch_rule({**values, "best_by": "epoch_loss"}) == values  # as before the key existed
    assert with_best_epoch_rule(values) == {**values, "best_by": "fixed_batch"}  # the default: trained again
    assert with_best_epoch_rule({**values, "best_by": "fixed_batch"}) == with_best_epoch_rule(values)

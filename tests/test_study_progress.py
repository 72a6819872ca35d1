"""The study's progress lines (`evaluation/experiment.sh`): a start and a done line for every unit it runs, in
the order of its plan, with the time elapsed and left; the units a resumed study finds in its ledger; and the
time-left arithmetic on hand-made units."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from evaluation.study import run as study_run
from evaluation.study.run import main as study_main
from evaluation.study.units import Part, PlannedUnit, Rate, Term
from evaluation.study.progress import (PRIOR_SECONDS_PER_MEGAPIXEL, Timed, UnitCost, UnitProgress, time_left,
                                       unit_cost)

from test_study import study_values

START = re.compile(r"^\[(?P<kind>[a-z-]+)\] (?P<what>.+) \| unit (?P<position>\d+)/(?P<units>\d+), est\. [^|]+ \| "
                   r"elapsed (?P<elapsed>\d+:\d\d:\d\d), left ~(?P<left>\d+:\d\d:\d\d)")
DONE = re.compile(r"^\[done\] (?P<what>.+) in [^|]+ \(est\. [^)]+\) \| unit (?P<position>\d+)/(?P<units>\d+) \| "
                  r"elapsed (?P<elapsed>\d+:\d\d:\d\d), left ~(?P<left>\d+:\d\d:\d\d)")
# the units of the study below, in run order: the paste generator, the SDM, its inpainting; each real-only seed
# with its label alignment of both generators; then the other variants' segmenters
KINDS = (["sample", "sdm-train", "sdm-finetune", "sample"] + ["segmenter", "alignment", "alignment"] * 2
         + ["segmenter"] * 4)


def seconds(text: str) -> int:
    hours, minutes, secs = (int(part) for part in text.split(":"))
    return 3600 * hours + 60 * minutes + secs


def run(argv: list[str]) -> list[str]:
    """The study's stdout lines (main, in this process), tqdm's switch restored after."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv("TQDM_DISABLE", "1")
        assert study_main(argv) == 0
    return out.getvalue().splitlines()


@pytest.fixture(scope="module")
def quick_study(demo_dir, tmp_path_factory):
    """The quick study of paste and SDM inpainting at 100 %, run once from nothing as a user runs it:
    `evaluation/experiment.sh -c study.json --quick --no-progress`. Its stdout lines, and its stderr."""
    folder = tmp_path_factory.mktemp("progress")
    values = study_values(demo_dir, folder / "study", real_fractions=[1.0],
                          variants=[{"name": "real"}, {"name": "paste", "synthetic": ["paste"]},
                                    {"name": "sdm_inpaint", "synthetic": ["sdm_inpaint"]}])
    values["generators"] = {name: values["generators"][name] for name in ("paste", "sdm_inpaint")}
    path = folder / "study.json"
    path.write_text(json.dumps(values))
    argv = ["-c", str(path), "--quick", "--no-progress"]
    done = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "evaluation" / "experiment.sh"), *argv],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return argv, folder / "study_quick", done.stdout.splitlines(), done.stderr


def test_the_quick_study_prints_a_start_and_a_done_line_for_every_unit_in_order(quick_study):
    _, root, lines, _ = quick_study
    progress = [line for line in lines if START.match(line) or DONE.match(line)]
    starts, dones = progress[0::2], progress[1::2]
    assert len(starts) == len(dones) == len(KINDS)
    units = len((root / "ledger.jsonl").read_text().splitlines())
    assert units == len(KINDS), "every unit run is one of the plan, which counts them all"
    for position, (start, done, kind) in enumerate(zip(starts, dones, KINDS), start=1):
        started, finished = START.match(start), DONE.match(done)
        assert started and finished, (start, done)  # a start line, then the done line of the same unit
        assert started["kind"] == kind and started["what"] == finished["what"]
        assert int(started["position"]) == int(finished["position"]) == position
        assert int(started["units"]) == int(finished["units"]) == units
        assert seconds(started["elapsed"]) <= seconds(finished["elapsed"])
    assert START.match(starts[0])["what"] == "generator paste (paste) at r100"
    # the paste generator has no model work to time: the prior alone until the SDM's training is done
    assert all("(prior rates: nothing timed yet)" in line for line in (starts[0], dones[0], starts[1]))
    assert not any("nothing timed" in line for line in dones[1:] + starts[2:])
    assert seconds(START.match(starts[-1])["left"]) > 0, "a unit starting counts its own time left"
    assert DONE.match(dones[-1])["left"] == "0:00:00"
    assert re.match(rf"^\[done\] all {units} units: {units} run in \d+:\d\d:\d\d, 0 already done \| elapsed ",
                    lines[-2]), lines[-2]
    assert lines[-1].startswith("report: ")


def test_no_progress_leaves_no_bar_in_the_log(quick_study):
    """--no-progress: not one progress bar, the SDM's training, the sampler's and the paste mode's included (tqdm
    reads its switch at import, so experiment.sh sets it before Python starts, and the bars that pass `disable`
    themselves read it too)."""
    _, _, lines, stderr = quick_study
    stdout = "\n".join(lines)
    assert "report:" in stdout and "[sdm-train]" in stdout and "[sample] generator sdm_inpaint" in stdout
    assert "it/s" not in stderr + stdout and "image/s" not in stderr + stdout
    assert "|" not in stderr, stderr


def test_no_progress_turns_the_bars_off_while_the_study_runs_and_leaves_the_variable_as_it_was(demo_dir, tmp_path,
                                                                                            monkeypatch):
    """In-process callers of the study's `main` (tests, scripts) keep their own bars afterwards."""
    seen = []
    monkeypatch.setattr(study_run, "run_study", lambda *args, **kwargs: seen.append(os.environ.get("TQDM_DISABLE")))
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study_values(demo_dir, tmp_path / "study")))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert study_main(["-c", str(path), "--no-progress"]) == 0
    assert seen == ["1"] and "TQDM_DISABLE" not in os.environ
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert study_main(["-c", str(path), "--no-progress"]) == 0 and study_main(["-c", str(path)]) == 0
    assert seen == ["1", "1", "0"] and os.environ["TQDM_DISABLE"] == "0"


def test_a_resumed_study_says_how_many_units_are_done_and_starts_only_the_others(quick_study):
    argv, root, _, _ = quick_study
    ledger = root / "ledger.jsonl"
    finished = ledger.read_text().splitlines()
    ledger.write_text("\n".join(finished[:11]) + "\n")  # as a kill during unit 12 leaves it
    lines = run(argv)
    (skipped,) = [line for line in lines if line.startswith("[ledger]")]
    assert re.match(r"^\[ledger\] 11 of 14 units already done, skipped \| elapsed \d+:\d\d:\d\d, left ~\d+:\d\d:\d\d$",
                    skipped), skipped
    assert "nothing timed" not in skipped, "the ledger's seconds of the done units price the others"
    starts = [START.match(line) for line in lines if START.match(line)]
    assert [(s["kind"], int(s["position"])) for s in starts] == [("segmenter", 12), ("segmenter", 13),
                                                                  ("segmenter", 14)]
    assert lines.index(skipped) < lines.index(starts[0].string), "the done units are counted before the next starts"
    assert any(line.startswith("[done] all 14 units: 3 run in ") and ", 11 already done" in line for line in lines)

    lines = run(argv)
    assert "[ledger] 14 of 14 units already done, skipped" in "\n".join(lines)
    assert not any(START.match(line) for line in lines)


def test_a_one_unit_run_prices_its_unit_from_the_times_the_ledger_holds(quick_study):
    """--unit (a Slurm job, or a unit run by hand): the rest of the plan is only read from the ledger, and the
    seconds recorded there calibrate the unit's estimate, as they do a resumed study's."""
    argv, root, _, _ = quick_study
    ledger = root / "ledger.jsonl"
    finished = ledger.read_text().splitlines()
    last = json.loads(finished[-1])["unit"]
    ledger.write_text("\n".join(finished[:-1]) + "\n")
    lines = run(argv + ["--unit", last])
    (start,) = [line for line in lines if START.match(line)]
    assert START.match(start)["position"] == START.match(start)["units"] == "1", start
    assert "nothing timed" not in start, start
    assert json.loads(ledger.read_text().splitlines()[-1])["unit"] == last


def unit(kind: str, model: str, what: str, count: float) -> PlannedUnit:
    """A unit of `count` steps (or images) of one megapixel each: `count` x the prior's rate in seconds."""
    return PlannedUnit(kind, (1.0, kind, count), (Part("stage", "work", (Term(count, Rate(model, what, 1, 1000)),)),))


def test_a_units_prior_is_its_megapixels_at_the_prior_rates_and_its_kind_the_largest_part():
    segmenter = PlannedUnit("segmenter", (1.0, "real", 0), (Part("segmenters", "work", (
        Term(1000, Rate("segmenter", "train_step", 8, 128)), Term(500, Rate("segmenter", "predict_image", 1, 128)))),))
    cost = unit_cost(segmenter)
    megapixels = 128 * 128 / 1e6
    assert cost.kind == "segmenter step"
    assert cost.prior == pytest.approx(1000 * 8 * megapixels * PRIOR_SECONDS_PER_MEGAPIXEL["segmenter", "train_step"]
                                       + 500 * megapixels * PRIOR_SECONDS_PER_MEGAPIXEL["segmenter", "predict_image"])
    assert unit_cost(PlannedUnit("sample", (1.0, "paste"), (Part("paste", "no model"),))) == UnitCost("", 0.0)


def test_the_time_left_scales_each_units_prior_by_the_units_of_its_kind_timed_so_far():
    sdm, forward, segmenter = UnitCost("SDM step", 600.0), UnitCost("SDM forward", 300.0), UnitCost("segmenter step",
                                                                                                    100.0)
    assert time_left([sdm, forward, segmenter, segmenter], []) == 1100.0  # the prior alone
    timed = [Timed(sdm, 300.0, here=True)]  # this machine: twice the prior's speed
    assert time_left([forward, segmenter, segmenter], timed) == pytest.approx(150 + 50 + 50)
    timed.append(Timed(segmenter, 150.0, here=True))  # segmenters at 1.5 x the prior, forwards at the overall 450/700
    assert time_left([forward, segmenter], timed) == pytest.approx(300 * 450 / 700 + 150)
    # seconds recorded in the ledger by an earlier run count until a unit of the kind runs here
    assert time_left([segmenter], [Timed(segmenter, 50.0, False), Timed(sdm, 300.0, True)]) == pytest.approx(50)
    assert time_left([segmenter], [Timed(segmenter, 50.0, False), Timed(segmenter, 200.0, True)]) == 200
    # a unit of no model work (paste) costs nothing and calibrates nothing
    assert time_left([segmenter], [Timed(UnitCost("", 0.0), 5.0, True)]) == 100


def test_the_lines_add_elapsed_and_left_from_a_clock_and_count_ledger_units_on_one_line():
    now = [0.0]
    lines: list[str] = []
    units = [unit("sdm-train", "sdm", "train_step", 10), unit("segmenter", "segmenter", "train_step", 100),
             unit("segmenter", "segmenter", "train_step", 200)]  # priors 300, 180 and 360 s
    progress = UnitProgress(units, lines.append, started=0.0, clock_now=lambda: now[0])
    progress.start("sdm-train", units[0].where, "the SDM")
    now[0] = 150.0
    progress.finish("sdm-train", units[0].where, 150.0)  # half the prior: the segmenters' 540 s read 270
    progress.start("segmenter", units[1].where, "seed 0")
    now[0] = 420.0
    progress.finish("segmenter", units[1].where, 270.0)  # 1.5 x the prior: the next reads 540 s
    progress.start("filter", (1.0, "new"), "a unit the plan lacks")
    progress.finish("filter", (1.0, "new"), 6.0)
    assert lines == [
        "[sdm-train] the SDM | unit 1/3, est. 5 min | elapsed 0:00:00, left ~0:14:00 (prior rates: nothing timed yet)",
        "[done] the SDM in 2 min (est. 5 min) | unit 1/3 | elapsed 0:02:30, left ~0:04:30",
        "[segmenter] seed 0 | unit 2/3, est. 2 min | elapsed 0:02:30, left ~0:04:30",
        "[done] seed 0 in 4 min (est. 2 min) | unit 2/3 | elapsed 0:07:00, left ~0:09:00",
        "[filter] a unit the plan lacks | unit 4/4, not in the plan: no estimate | elapsed 0:07:00, left ~0:09:00",
        "[done] a unit the plan lacks in 6 s (est. 0 s) | unit 4/4 | elapsed 0:07:00, left ~0:09:00",
    ]

    lines.clear()
    resumed = UnitProgress(units, lines.append, started=0.0, clock_now=lambda: 3.0)
    resumed.skip("sdm-train", units[0].where, 600.0)  # recorded at twice the prior
    resumed.skip("segmenter", units[1].where, None)  # no seconds recorded: counted, not timed
    resumed.start("segmenter", units[2].where, "seed 1")
    resumed.close()
    assert lines == ["[ledger] 2 of 3 units already done, skipped | elapsed 0:00:03, left ~0:12:00",
                     "[segmenter] seed 1 | unit 3/3, est. 12 min | elapsed 0:00:03, left ~0:12:00",
                     "[done] all 3 units: 0 run in 0:00:00, 2 already done | elapsed 0:00:03"]

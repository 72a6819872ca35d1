"""The study's progress lines: one when a unit starts, one when it is done, one for the units the ledger already
holds, each with the time elapsed and an estimate of the time left, so that a 2-hour run shows where it is.

The time left prices each unit not reached yet by its work (plan.plan_units, the list `--estimate` prices)
at a prior rate per kind of work (`PRIOR_SECONDS_PER_MEGAPIXEL`), scaled by what the units already timed took
against that prior: units of the same kind first, else any kind (the machine's speed against the prior's). No
model is timed at the start; the estimate's few timed steps cost a minute the study need not spend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .units import PlannedUnit

PRIOR_SECONDS_PER_MEGAPIXEL = {
    ("sdm", "train_step"): 30.0, ("sdm", "finetune_step"): 30.0, ("sdm", "forward"): 17.0,
    ("masks", "train_step"): 30.0, ("masks", "forward"): 17.0,
    ("segmenter", "train_step"): 1.8, ("segmenter", "predict_image"): 0.6,
}
"""Seconds per million pixels through each kind of work (a step's batch x crop, a forward call's rows x image):
`--estimate` of round one's study (configs/experiment_magnetic_tile_round_one.json) on 2 CPU cores with native
bf16 (2026-12-06: SDM step 1.0 s at batch 8 of 64 px crops, forward call 9 s of 32 rows at 128 px, segmenter step
0.24 s at batch 8 of 128 px, 0.01 s a predicted image). The mask generator, not timed there, is priced as the
SDM. Only the units run before any of their kind lean on it; a machine 3x slower reads 3x from its first unit on."""

KINDS_OF_WORK = {
    ("sdm", "train_step"): "SDM step", ("sdm", "finetune_step"): "SDM step", ("sdm", "forward"): "SDM forward",
    ("masks", "train_step"): "mask generator step", ("masks", "forward"): "mask generator forward",
    ("segmenter", "train_step"): "segmenter step", ("segmenter", "predict_image"): "segmenter prediction",
}
"""The kinds of work calibrated apart (an SDM's finetuning step is its training step at another batch)."""


class UnitCost(NamedTuple):
    """A unit's seconds at the prior rates, and the kind of work that takes most of them."""

    kind: str
    prior: float


class Timed(NamedTuple):
    """A unit's real seconds: run here (`here`), or recorded in the ledger by an earlier run of the study."""

    cost: UnitCost
    seconds: float
    here: bool


def unit_cost(unit: PlannedUnit) -> UnitCost:
    """The prior seconds of a unit's work and its main kind of work ("" for a unit of no model work: paste)."""
    priced = [(term.count * term.rate.megapixels * PRIOR_SECONDS_PER_MEGAPIXEL[term.rate.model, term.rate.what],
               KINDS_OF_WORK[term.rate.model, term.rate.what]) for term in unit.terms]
    if not priced:
        return UnitCost("", 0.0)
    return UnitCost(max(priced)[1], sum(seconds for seconds, _ in priced))


def scale(kind: str, timed: Sequence[Timed]) -> float:
    """Real seconds over prior seconds of the timed units: those of `kind` run here, else of `kind` in the ledger,
    else of any kind run here, else any in the ledger; 1 (the prior) before any."""
    priced = [t for t in timed if t.cost.prior > 0]
    for pool in ([t for t in priced if t.here and t.cost.kind == kind],
                 [t for t in priced if not t.here and t.cost.kind == kind],
                 [t for t in priced if t.here], priced):
        if pool:
            return sum(t.seconds for t in pool) / sum(t.cost.prior for t in pool)
    return 1.0


def estimated_seconds(cost: UnitCost, timed: Sequence[Timed]) -> float:
    return cost.prior * scale(cost.kind, timed)


def time_left(costs: Sequence[UnitCost], timed: Sequence[Timed]) -> float:
    """The estimated seconds of the units `costs` (those not reached yet), calibrated on the `timed` ones."""
    return sum(estimated_seconds(cost, timed) for cost in costs)


def format_duration(seconds: float) -> str:
    """'4 h 05 min', '12 min', '40 s'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def clock(seconds: float) -> str:
    """'1:02:05' (hours, minutes, seconds)."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class UnitProgress:
    """Writes the progress lines of a study whose units are `units` (plan.plan_units, in run order), timed
    from `started` (time.perf_counter of the study's start):

        [segmenter] segmenter r025 real seed 1 | unit 5/17, est. 6 min | elapsed 0:42:10, left ~1:35:00
        [done] segmenter r025 real seed 1 in 5 min (est. 6 min) | unit 5/17 | elapsed 0:47:12, left ~1:30:00
        [ledger] 12 of 17 units already done, skipped | elapsed 0:00:04, left ~0:31:00

    The units the ledger holds are counted as they are met, on one line before the next unit starts (a killed
    study's finished units come first, so a resumed one says at once how many are done). Until then the time left
    counts every unit not reached, including done ones further on (after a changed setting)."""

    def __init__(self, units: Sequence[PlannedUnit], log: Callable[[str], None], started: float,
                 clock_now: Callable[[], float] = time.perf_counter):
        self.units, self.log, self.started, self.now = list(units), log, started, clock_now
        self.costs = [unit_cost(unit) for unit in self.units]
        self.reached = [False] * len(self.units)
        self.timed: list[Timed] = []
        self.skipped = self.done = self.ran = 0
        self.run_seconds = 0.0
        self.current: dict[tuple, tuple[int, str, float]] = {}  # (kind, where) -> position, what, estimate

    def _position(self, kind: str, where: tuple) -> tuple[int, bool]:
        """The unit's place in the plan, and whether the plan has it. A unit the plan lacks (a run.py and
        plan.py out of step: a bug) is added at the end, without an estimate, so its line still shows."""
        for position, unit in enumerate(self.units):
            if not self.reached[position] and unit.kind == kind and unit.where == where:
                return position, True
        self.units.append(PlannedUnit(kind, where, ()))
        self.costs.append(UnitCost("", 0.0))
        self.reached.append(False)
        return len(self.units) - 1, False

    def _times(self, running: float = 0.0) -> str:
        """Elapsed and left: the units not reached, and `running` seconds of the unit starting."""
        left = running + time_left([c for c, reached in zip(self.costs, self.reached) if not reached], self.timed)
        timed = any(t.cost.prior > 0 for t in self.timed)
        return (f"elapsed {clock(self.now() - self.started)}, left ~{clock(left)}"
                + ("" if timed else " (prior rates: nothing timed yet)"))

    def _report_skipped(self) -> None:
        if not self.skipped:
            return
        if self.skipped == self.done:
            counted = f"{self.done} of {len(self.units)} units already done"
        else:
            counted = f"{self.skipped} more units already done ({self.done} of {len(self.units)} in all)"
        self.skipped = 0
        self.log(f"[ledger] {counted}, skipped | {self._times()}")

    def skip(self, kind: str, where: tuple, seconds: float | None) -> None:
        """A unit the ledger holds, with the seconds it took then (calibration, where recorded)."""
        position, _ = self._position(kind, where)
        self.reached[position] = True
        self.skipped += 1
        self.done += 1
        self.calibrate(self.units[position], seconds)

    def calibrate(self, unit: PlannedUnit, seconds: float | None) -> None:
        """A unit done before this run (found in the ledger), with the seconds it took then, where recorded: it
        calibrates the estimates. A one-unit run calls it for the units outside its list."""
        if seconds is not None:
            self.timed.append(Timed(unit_cost(unit), float(seconds), here=False))

    def start(self, kind: str, where: tuple, what: str) -> None:
        self._report_skipped()
        position, planned = self._position(kind, where)
        self.reached[position] = True
        estimate = estimated_seconds(self.costs[position], self.timed)
        self.current[kind, where] = (position, what, estimate)
        guess = f"est. {format_duration(estimate)}" if planned else "not in the plan: no estimate"
        self.log(f"[{kind}] {what} | unit {position + 1}/{len(self.units)}, {guess} | {self._times(estimate)}")

    def finish(self, kind: str, where: tuple, seconds: float) -> None:
        position, what, estimate = self.current.pop((kind, where))
        self.timed.append(Timed(self.costs[position], seconds, here=True))
        self.ran += 1
        self.run_seconds += seconds
        self.log(f"[done] {what} in {format_duration(seconds)} (est. {format_duration(estimate)}) | unit "
                 f"{position + 1}/{len(self.units)} | {self._times()}")

    def close(self) -> None:
        """The last line, once every unit is reached."""
        self._report_skipped()
        self.log(f"[done] all {len(self.units)} units: {self.ran} run in {clock(self.run_seconds)}, {self.done} "
                 f"already done | elapsed {clock(self.now() - self.started)}")

"""What the study's stages share: the Study (config, folder, classes, ledger, device, split) and the data split.

A module of its own so that the runner (run.py), the generator kinds (generators/) and the report (report.py)
all import it and none imports another back."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guided_diffusion.data import Pair
from guided_diffusion.errors import ConfigError
from guided_diffusion.run_folder import FileLock

from .config import StudyConfig
from .progress import UnitProgress
from .units import PlannedUnit, fraction_tag


RUN_UNDER_ROOT = re.compile(r"^(?:(.*)/)?(?:generator|synthetic|masks)/r\d{3}/")
"""A unit's run folder under the study folder (group 1: the study folder as spelled)."""


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able values: what decides a unit of work's result."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class Ledger:
    """The study's record of finished work (`ledger.jsonl`, one JSON object a line, appended and flushed): a
    unit's kind, its key and fingerprint, its result and seconds. A rerun reads it to skip finished units."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                self.entries[(entry["kind"], entry["fingerprint"])] = entry

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return self.entries.get((kind, key))

    def spelling_of(self, root: Path) -> Path:
        """The study folder `root` as the ledger's units spelled it, where that spelling names the same folder
        from here: the subsets' folder paths are part of the SDM, sample and mask units' fingerprints, so
        `Results/x` and `/abs/.../Results/x` would otherwise be two studies. The spelling is read from the run
        folders the units recorded (<root>/generator|synthetic|masks/rNNN/...), the last one first; else `root`."""
        for entry in reversed(list(self.entries.values())):
            found = RUN_UNDER_ROOT.match(str(entry.get("run_dir", "")))
            if found:
                spelled = Path(found.group(1) or ".")
                return spelled if spelled != root and spelled.resolve() == root.resolve() else root
        return root

    def add(self, kind: str, key: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Append a finished unit. Units run as Slurm jobs append to one ledger at once: each line is written
        whole, in one call, under an exclusive lock of the file (where the file system locks: else as one append)."""
        entry = {"kind": kind, "fingerprint": key, "seconds": round(seconds, 2), **result}
        with FileLock.take(self.path, wait=True) as lock:  # unlocked on a mount without flock: one write
            lock.handle.write(json.dumps(entry, default=float) + "\n")
            lock.handle.flush()
        self.entries[(kind, key)] = entry
        return entry


class StudyLock:
    """A run of the whole study holds its folder (an exclusive lock of `study.lock`): a second run of the same
    study started meanwhile, which would train and sample the same units into the same folders, stops with one
    line instead. The units that `--jobs` and Slurm start (`--unit`) and the report-only runs take no lock."""

    def __init__(self, root: Path):
        self.path = root / "study.lock"
        lock = FileLock.take(self.path)
        if lock is None:
            raise ConfigError(f"output_dir {root} is in use: another run of this study holds {self.path}; let it "
                              "end (or stop it) first, or give another output_dir")
        self.lock = lock

    def release(self) -> None:
        self.lock.release()


@dataclass
class Split:
    val: list[Pair]
    subsets: dict[float, list[Pair]]
    test: list[Pair]


@dataclass
class Study:
    """What the stages share: the config, its folder, the dataset's classes, the ledger and the device."""

    config: StudyConfig
    root: Path
    num_classes: int
    class_names: list[str]
    ledger: Ledger
    device: Any
    bf16: bool
    log: Callable[[str], None]
    unit_progress: UnitProgress  # the progress lines of the units run and skipped
    split: Split
    processor: str = ""  # the model of the CPU (or GPU) the units run on: recorded with each unit
    progress: bool = True  # tqdm bars
    report_only: bool = False  # run nothing: report what the ledger holds
    only: str | None = None  # run just the unit of this id (a Slurm job): the others are read from the ledger
    used: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # the units this run reads or runs
    lock: StudyLock | None = None  # a run of the whole study holds its folder

    def release(self) -> None:
        """Let go of the study folder (the end of a run of the whole study)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def report_root(self) -> Path:
        """The folder of this config's report: `report_dir` inside the study folder."""
        return self.root / self.config.report_dir

    def subset_dir(self, fraction: float) -> Path:
        """The dataset folder of links of a fraction's subset (laid out when the study starts)."""
        return self.root / "data" / fraction_tag(fraction)

    def subset_key(self, fraction: float) -> str:
        """What identifies a fraction's real subset in the keys of the units trained or sampled on it."""
        return fingerprint([p.stem for p in self.split.subsets[fraction]], self.config.data_dir)

    def precision(self, wanted: str) -> str:
        """What a stage's `precision` key resolves to on the study's device: "bf16" (autocast) or "fp32"."""
        from guided_diffusion.model_setup import bf16_autocast

        return "bf16" if bf16_autocast(wanted, self.device) else "fp32"

    def runs(self, unit: PlannedUnit) -> bool:
        """Whether this run may run `unit` (else it only reads the ledger): not in a report-only run, and in a
        run of one unit only that one."""
        return not self.report_only and (self.only is None or unit.id == self.only)

    def unit(self, unit: PlannedUnit, key: str, what: str, work: Callable[[], dict[str, Any]]
             ) -> dict[str, Any] | None:
        """Run `work` unless the ledger holds (kind, key); record its result and time. A unit this run may not
        run (`runs`) gives its ledger entry, or None when it is not done."""
        kind, where = unit.kind, unit.where
        self.used.add((kind, key))
        done = self.ledger.get(kind, key)
        if not self.runs(unit):
            if done is not None and self.only is not None:  # a one-unit run prices its unit from the others' times
                self.unit_progress.calibrate(unit, done.get("seconds"))
            return done
        if done is not None:
            self.unit_progress.skip(kind, where, done.get("seconds"))
            return done
        self.unit_progress.start(kind, where, what)
        started = time.perf_counter()
        # where and how it ran: bf16 scores differ between processor models (the report warns on mixed pairs);
        # a unit that trains or samples an SDM reports the precision its own config resolved to. The CPU threads
        # torch used change the rounding of sums, not what a seed draws (init, batch order), and are recorded.
        import torch

        result = {"unit": unit.id, "processor": self.processor, "precision": "bf16" if self.bf16 else "fp32",
                  "threads": torch.get_num_threads(), **work()}
        entry = self.ledger.add(kind, key, result, time.perf_counter() - started)
        self.unit_progress.finish(kind, where, entry["seconds"])
        return entry

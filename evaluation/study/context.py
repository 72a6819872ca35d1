"""What the study's stages share: the Study (config, folder, classes, ledger, device) and the data split.

A module of its own so that the runner (run.py) and the report (report.py) both import it and neither imports
the other back."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guided_diffusion.data import Pair

from .config import StudyConfig
from .progress import UnitProgress


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

    def add(self, kind: str, key: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        entry = {"kind": kind, "fingerprint": key, "seconds": round(seconds, 2), **result}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=float) + "\n")
        self.entries[(kind, key)] = entry
        return entry


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
    processor: str = ""  # the model of the CPU (or GPU) the units run on: recorded with each unit
    progress: bool = True  # tqdm bars
    report_only: bool = False  # run nothing: report what the ledger holds
    used: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # the units this run reads or runs

    def unit(self, kind: str, key: str, what: str, work: Callable[[], dict[str, Any]], where: tuple
             ) -> dict[str, Any] | None:
        """Run `work` unless the ledger holds (kind, key); record its result and time. With `report_only`, a
        unit not in the ledger is not run and gives None. `where` names the unit in the plan
        (plan.plan_units) for the progress lines."""
        self.used.add((kind, key))
        done = self.ledger.get(kind, key)
        if self.report_only:
            return done
        if done is not None:
            self.unit_progress.skip(kind, where, done.get("seconds"))
            return done
        self.unit_progress.start(kind, where, what)
        started = time.perf_counter()
        # where and how it ran: bf16 scores differ between processor models (the report warns on mixed pairs);
        # a unit that trains or samples an SDM reports the precision its own config resolved to
        result = {"processor": self.processor, "precision": "bf16" if self.bf16 else "fp32", **work()}
        entry = self.ledger.add(kind, key, result, time.perf_counter() - started)
        self.unit_progress.finish(kind, where, entry["seconds"])
        return entry

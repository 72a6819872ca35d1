"""Shared test fixtures: the tiny model config (32 px, 32 channels) and the datasets tests run on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
MAGNETIC_TILE = SHARED / "datasets" / "magnetic-tile"
MAGNETIC_TILE_BINARY = SHARED / "datasets" / "magnetic-tile-binary"

TINY_MODEL = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2,2",
    "attention_resolutions": "16",
    "num_head_channels": 32,
}


SLURM_FILES = ("test_slurm.py", "test_study_slurm.py")
"""The files whose module fixture starts a local Slurm cluster (2 CPUs): one worker runs them all, one cluster at
a time, as a plain run does."""

LONGEST_FIRST = ("slurm", "test_study.py", "test_benchmarks.py", "test_study_progress.py", "test_train.py",
                 "test_distributed.py", "test_study_jobs.py", "test_samplers.py", "test_gpu_check.py", "test_watch.py")
"""The work units that take longest, longest first (seconds summed per unit from `--durations=0` of `.ci/run`,
2026-12-07, 2-core AVX2 machine: 423, 323, 247, 119, 87, 85, 76, 72, 62, 60, of 1,952 in all; every other file takes
under a minute). `-n auto --dist loadfile` hands them out first, so that no worker is left alone with a long file at
the end; the others follow in xdist's order (most tests first)."""

MOST_WORKERS = 4
"""`-n auto` starts one worker per core, at most this many: each worker's tests and the processes they start share
the cores, and a worker holds a few hundred MB."""


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MOST_WORKERS, _cores()))


def pytest_configure(config) -> None:
    """In a worker of pytest-xdist (`-n`): torch, and the Python processes its tests start, use the worker's share
    of the cores (OMP_NUM_THREADS, unless set already), so that the workers' threads do not outnumber the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // workers))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def work_unit(nodeid: str) -> str:
    """What one worker runs whole under `--dist loadfile`: a test's file, so that each module fixture is built
    once, or "slurm" for the Slurm files, so that one worker runs both, one cluster at a time."""
    path = nodeid.split("::", 1)[0]
    return "slurm" if Path(path).name in SLURM_FILES else path


def _longest_first(unit: str) -> int:
    name = Path(unit).name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the Slurm files as one unit and the longest units handed out first. (xdist's own
    `loadgroup` cannot group by file here: under pytest 9 it cannot rename the tests it groups, found 2026-12-07,
    and every file's tests were spread over both workers, their module fixtures built twice.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node) -> None:
            for unit in sorted(self.workqueue, key=_longest_first):  # stable: the rest keep xdist's order
                self.workqueue.move_to_end(unit)
            super()._assign_work_unit(node)

    return FileScheduling(config, log)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from guided_diffusion.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", num_train=12, num_test=4, image_size=32)


@pytest.fixture(scope="session")
def trained_run(demo_dir, tmp_path_factory) -> Path:
    """A tiny model trained for 2 steps on the demo dataset: enough for sampling tests, which only read it."""
    from guided_diffusion.config import config_from_dict
    from guided_diffusion.train import Trainer
    root = tmp_path_factory.mktemp("trained")
    config, _ = config_from_dict("train", tiny_train_config(demo_dir, root, max_steps=2))
    return Trainer(config, "train", log=lambda *_: None).run().run_dir


def tiny_train_config(data_dir: Path, root: Path, **changes) -> dict:
    """A train config dict for a tiny model: a few steps on CPU take seconds."""
    return {"data_dir": str(data_dir), "num_classes": 4, "root_log_dir": str(root), "batch_size": 4,
            "lr": 1e-3, "max_epochs": 2, "save_interval": 2, "log_interval": 1, **TINY_MODEL, **changes}


def write_config(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values))
    return path


def make_scene_dataset(root: Path, num_train: int = 10, num_test: int = 4, width: int = 48, height: int = 28,
                       seed: int = 0) -> Path:
    """A street-scene-like dataset unlike the demo: RGB, non-square (48 x 28), 5 classes of which 0 is "road" (no
    background class: every image is mostly road), and a void id 255 along the horizon, as scene datasets have."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[90, 90, 90], [200, 30, 30], [120, 180, 250], [40, 160, 40], [230, 200, 40]])
    for split, count in (("train", num_train), ("test", num_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((height, width), np.uint8)
            horizon = int(rng.integers(8, 14))
            mask[:horizon] = 2  # sky
            mask[horizon] = 255  # void
            left = int(rng.integers(0, width - 12))
            mask[horizon + 3:horizon + 9, left:left + 10] = 1  # car
            mask[horizon + 1:, :4] = 3  # verge
            if i % 2:
                mask[-6:-2, width - 10:width - 6] = 4  # sign
            image = colours[np.where(mask == 255, 0, mask)] + rng.integers(-20, 21, (height, width, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / split / "images" / f"s{i:03d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"s{i:03d}.png")
    return root

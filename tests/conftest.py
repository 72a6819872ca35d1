"""Shared test fixtures: the tiny model config (32 px, 32 channels) and the datasets tests run on."""

from __future__ import annotations

import json
from pathlib import Path

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

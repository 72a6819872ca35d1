"""`main.py` end to end: train -> finetune -> sample on the real magnetic-tile datasets, and user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from conftest import MAGNETIC_TILE, MAGNETIC_TILE_BINARY, TINY_MODEL, write_config

REPO = Path(__file__).resolve().parents[1]
needs_real_data = pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/datasets is not present")


def run_main(tmp_path: Path, action: str, values: dict, *extra: str) -> int:
    return main.main([action, "-c", str(write_config(tmp_path / f"config_{action}.json", values)), *extra])


@needs_real_data
@pytest.mark.parametrize("dataset, mode, num_classes", [(MAGNETIC_TILE, "multi-class", 6),
                                                        (MAGNETIC_TILE_BINARY, "binary", 2)])
def test_train_finetune_sample_on_magnetic_tile(tmp_path, dataset, mode, num_classes):
    root = tmp_path / "Results"
    common = {"data_dir": str(dataset), "dataset_mode": mode, "root_log_dir": str(root), **TINY_MODEL}
    train = {**common, "num_classes": num_classes, "batch_size": 4, "max_steps": 2, "save_interval": 1}
    assert run_main(tmp_path, "train", train) == 0
    assert (root / "train_001" / "checkpoints" / "best.pt").is_file()

    finetune = {**train, "resume_checkpoint": str(root), "drop_rate": 0.2}
    assert run_main(tmp_path, "finetune", finetune) == 0
    assert (root / "finetune_001" / "checkpoints" / "best.pt").is_file()

    sample = {**common, "model_path": str(root), "num_samples": 2, "batch_size": 2, "diffusion_steps": 21}
    assert run_main(tmp_path, "sample", sample) == 0
    run_dir = root / "sample_001"
    samples = sorted((run_dir / "samples").glob("*.png"))
    assert len(samples) == 2 and (run_dir / "grid.png").is_file()
    label = np.asarray(Image.open(run_dir / "labels" / samples[0].name))
    assert label.shape == (32, 32) and label.max() < num_classes
    assert "finetune_001" in (run_dir / "config.json").read_text()  # the newest checkpoint was used


def test_a_second_run_never_touches_the_first(demo_dir, tmp_path):
    root = tmp_path / "Results"
    values = {"data_dir": str(demo_dir), "num_classes": 4, "root_log_dir": str(root), "max_steps": 1,
              "batch_size": 2, **TINY_MODEL}
    assert run_main(tmp_path, "train", values) == 0
    first = (root / "train_001" / "checkpoints" / "best.pt").read_bytes()
    assert run_main(tmp_path, "train", values) == 0
    assert (root / "train_002").is_dir()
    assert (root / "train_001" / "checkpoints" / "best.pt").read_bytes() == first


def test_dry_run_prints_the_resolved_config(demo_dir, tmp_path, capsys):
    values = {"data_dir": str(demo_dir), "num_classes": 4, "root_log_dir": str(tmp_path / "R"), **TINY_MODEL}
    assert run_main(tmp_path, "train", values, "--dry-run", "--set", "lr=0.5") == 0
    out = capsys.readouterr().out
    assert '"lr": 0.5' in out and not (tmp_path / "R").exists()


def cli(tmp_path: Path, action: str, values: dict) -> subprocess.CompletedProcess:
    config = write_config(tmp_path / "config.json", values)
    return subprocess.run([sys.executable, "main.py", action, "-c", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_config_key_exits_2_with_one_line(tmp_path):
    result = cli(tmp_path, "train", {"data_dir": "x", "num_classes": 3, "batchsize": 4})
    assert_one_line_error(result, "config.json", "unknown key 'batchsize'", "did you mean 'batch_size'")


def test_broken_dataset_exits_2_with_one_line_naming_the_problem(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split / "images").mkdir(parents=True)
        (data / split / "masks").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / split / "images" / f"{split}_a.png")
        Image.fromarray(np.full((8, 8), 9, np.uint8)).save(data / split / "masks" / f"{split}_a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "train" / "images" / "orphan.png")
    result = cli(tmp_path, "train", {"data_dir": str(data), "num_classes": 3, "root_log_dir": str(tmp_path / "R"),
                                     **TINY_MODEL})
    assert_one_line_error(result, "orphan", "train_a.png", "9")
    assert not list((tmp_path / "R").glob("train_*/checkpoints/*.pt"))


def test_missing_model_path_exits_2_before_making_a_run_folder(tmp_path):
    result = cli(tmp_path, "sample", {"data_dir": "x", "model_path": str(tmp_path / "nope.pt"),
                                      "root_log_dir": str(tmp_path / "R")})
    assert_one_line_error(result, "model_path", "nope.pt")
    assert not (tmp_path / "R").exists()


def test_auto_resume_continues_the_newest_run_of_the_action(demo_dir, tmp_path, capsys):
    root = tmp_path / "Results"
    values = {"data_dir": str(demo_dir), "num_classes": 4, "root_log_dir": str(root), "batch_size": 2,
              "save_interval": 1, "auto_resume": True, **TINY_MODEL}
    assert run_main(tmp_path, "train", {**values, "max_steps": 2}) == 0
    assert run_main(tmp_path, "train", {**values, "max_steps": 3}) == 0
    assert "resuming exactly from" in capsys.readouterr().out
    from guided_diffusion.checkpoint import load_checkpoint
    assert load_checkpoint(root / "train_002" / "checkpoints" / "latest.pt")["train_state"]["step"] == 3


def test_keys_prints_an_actions_table_without_a_config(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "keys", "train"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("## `train`\n") and "| `max_epochs` | `100` |" in result.stdout


def test_keys_of_another_action_are_one_note_line_not_an_error(demo_dir, tmp_path):
    values = {"data_dir": str(demo_dir), "model_path": "m.pt", "root_log_dir": str(tmp_path / "R"), "lr": 1e-4,
              "max_steps": 2, "drop_rate": 0.2}
    config = write_config(tmp_path / "config.json", values)
    result = subprocess.run([sys.executable, "main.py", "sample", "-c", str(config), "--dry-run"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {config}: ignored for sample: lr, max_steps, drop_rate (keys of train/finetune)"]

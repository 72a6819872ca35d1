"""ISDM compatibility on ISDM's own files: the values of its three shipped configs (tests/fixtures/isdm/, paths
pointed at the demo dataset) load unchanged; keys of another action are reported once, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from conftest import tiny_train_config, write_config
from guided_diffusion.config import load_config

REPO = Path(__file__).resolve().parents[1]
ISDM = Path(__file__).resolve().parent / "fixtures" / "isdm"
RESULTS_PATH_REASON = "outputs go to a fresh run folder under root_log_dir"


def isdm_config(action: str, demo_dir: Path, tmp_path: Path) -> Path:
    """ISDM's config for `action` with data_dir and root_log_dir pointed at the test's dataset and folder."""
    values = json.loads((ISDM / f"config_{action}.json").read_text())
    values.update(data_dir=str(demo_dir), root_log_dir=str(tmp_path / "Results"))
    return write_config(tmp_path / f"isdm_{action}.json", values)


def note_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("note:")]


@pytest.mark.parametrize("action", ["train", "finetune", "sample"])
def test_isdm_config_runs_unchanged_with_dry_run(action, demo_dir, tmp_path, capsys):
    path = isdm_config(action, demo_dir, tmp_path)
    assert main.main([action, "-c", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out[out.index("{"):])
    assert resolved["data_dir"] == str(demo_dir) and resolved["image_size"] == 256
    assert not (tmp_path / "Results").exists()


def test_isdm_train_config_keeps_its_values(demo_dir, tmp_path):
    loaded = load_config(isdm_config("train", demo_dir, tmp_path), "train")
    config = loaded.config
    assert loaded.notes == []
    assert (config.dataset_mode, config.num_classes, config.batch_size, config.lr) == ("multi-class", 6, 32, 1e-4)
    assert config.weight_decay == 1e-5  # ISDM's spelling weights_decay
    assert config.precision == "auto" and config.use_checkpoint  # use_fp16: bf16 autocast where native
    assert config.resume_checkpoint == "Results/isdm/train_001"
    spec = config.unet_spec()
    assert (spec.model_channels, spec.channel_mult, spec.attention_ds) == (256, (1, 1, 2, 2, 4, 4), (8, 16, 32))


def test_isdm_finetune_config_is_binary_with_null_label_dropout(demo_dir, tmp_path):
    loaded = load_config(isdm_config("finetune", demo_dir, tmp_path), "finetune")
    config = loaded.config
    assert loaded.notes == []
    assert (config.dataset_mode, config.num_classes, config.drop_rate, config.lr) == ("binary", 2, 0.2, 1e-4)


def test_isdm_sample_config_keeps_isdm_sampling_and_reports_lr_and_results_path_in_one_line(demo_dir, tmp_path):
    path = isdm_config("sample", demo_dir, tmp_path)
    loaded = load_config(path, "sample")
    config = loaded.config
    assert (config.diffusion_steps, config.s, config.num_samples, config.sampler) == (300, 1.5, 840, "ancestral")
    assert config.rescale_timesteps and config.model_path == "Results/isdm/finetune_001"
    assert loaded.notes == [f"{path}: ignored for sample: lr (key of train/finetune); results_path "
                            f"({RESULTS_PATH_REASON})"]
    assert "lr" not in loaded.given and "results_path" not in loaded.given


def test_the_note_is_printed_once(demo_dir, tmp_path, capsys):
    path = isdm_config("sample", demo_dir, tmp_path)
    assert main.main(["sample", "-c", str(path), "--dry-run", "--set", "max_steps=2", "--set", "drop_rate=0.2"]) == 0
    assert note_lines(capsys.readouterr().out) == [
        f"note: {path}: ignored for sample: lr, max_steps, drop_rate (keys of train/finetune); results_path "
        f"({RESULTS_PATH_REASON})"]


def test_isdm_sample_config_through_train_reports_the_sample_keys(demo_dir, tmp_path, capsys):
    path = isdm_config("sample", demo_dir, tmp_path)
    assert main.main(["train", "-c", str(path), "--dry-run"]) == 0
    assert note_lines(capsys.readouterr().out) == [
        f"note: {path}: ignored for train: num_samples, model_path, s, use_ddim (keys of sample); results_path "
        f"({RESULTS_PATH_REASON})"]


@pytest.mark.parametrize("action", ["train", "finetune"])
def test_demo_training_configs_run_through_sample(action, demo_dir, tmp_path, capsys):
    path = REPO / "configs" / "demo" / f"config_{action}.json"
    overrides = [f"data_dir={demo_dir}", f"root_log_dir={tmp_path / 'R'}", "model_path=Results/demo", "max_steps=2"]
    assert main.main(["sample", "-c", str(path), "--dry-run", *[a for o in overrides for a in ("--set", o)]]) == 0
    (note,) = note_lines(capsys.readouterr().out)
    assert note.startswith(f"note: {path}: ignored for sample: lr, ") and "max_steps" in note
    assert note.endswith("(keys of train/finetune)")


def test_keys_of_train_have_no_effect_on_sampling(demo_dir, trained_run, tmp_path, capsys):
    """A train config plus model_path samples exactly what the sample keys alone sample."""
    sample_keys = {"model_path": str(trained_run), "num_samples": 2, "batch_size": 2, "timestep_respacing": "4"}
    with_train_keys = {**tiny_train_config(demo_dir, tmp_path / "a"), **sample_keys, "max_steps": 7, "drop_rate": 0.5}
    without = {k: v for k, v in with_train_keys.items() if k not in ("lr", "max_epochs", "save_interval",
                                                                       "log_interval", "max_steps", "drop_rate")}
    without["root_log_dir"] = str(tmp_path / "b")
    for name, values in (("with", with_train_keys), ("without", without)):
        assert main.main(["sample", "-c", str(write_config(tmp_path / f"{name}.json", values))]) == 0
    assert len(note_lines(capsys.readouterr().out)) == 1
    a = sorted((tmp_path / "a" / "sample_001" / "samples").glob("*.png"))
    b = sorted((tmp_path / "b" / "sample_001" / "samples").glob("*.png"))
    assert len(a) == 2 and [p.name for p in a] == [p.name for p in b]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))), x.name

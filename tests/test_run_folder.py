"""Tests for guided_diffusion/run_folder.py: run folders, JSON, palette, sample layout, grids and CSV logs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.run_folder import (
    RUN_LOCK,
    CsvLog,
    FileLock,
    SampleWriter,
    colorize,
    hold_run,
    latest_run_dir,
    new_run_dir,
    palette,
    run_dirs_newest_first,
    run_is_held,
    to_uint8_image,
    write_grid,
    write_json,
)

# ---------------------------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------------------------


def test_new_run_dir_numbers_from_one(tmp_path: Path) -> None:
    root = tmp_path / "Results"  # created when missing
    assert new_run_dir(root, "train") == root / "train_001"
    assert new_run_dir(root, "train") == root / "train_002"
    assert new_run_dir(root, "sample") == root / "sample_001"
    assert (root / "train_002").is_dir()


def test_new_run_dir_goes_past_highest_existing_number(tmp_path: Path) -> None:
    (tmp_path / "train_007").mkdir()
    (tmp_path / "train_007" / "model.pt").write_bytes(b"old")
    assert new_run_dir(tmp_path, "train") == tmp_path / "train_008"
    assert (tmp_path / "train_007" / "model.pt").read_bytes() == b"old"


def test_new_run_dir_does_not_fill_gaps(tmp_path: Path) -> None:
    for name in ("train_001", "train_005"):
        (tmp_path / name).mkdir()
    assert new_run_dir(tmp_path, "train") == tmp_path / "train_006"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_001", "train_005", "train_006"]


def test_new_run_dir_ignores_other_actions_and_skips_stray_files(tmp_path: Path) -> None:
    (tmp_path / "finetune_009").mkdir()
    (tmp_path / "train_001").write_text("a file, not a run folder")
    run = new_run_dir(tmp_path, "train")
    assert run == tmp_path / "train_002"
    assert (tmp_path / "train_001").read_text() == "a file, not a run folder"


def test_new_run_dir_is_unique_under_concurrency(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        runs = list(pool.map(lambda _: new_run_dir(tmp_path, "sample"), range(32)))
    assert len(set(runs)) == 32
    assert sorted(run.name for run in runs) == [f"sample_{n:03d}" for n in range(1, 33)]


def test_new_run_dir_rejects_bad_action(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run action"):
        new_run_dir(tmp_path, "../escape")


def test_latest_run_dir_is_highest_number(tmp_path: Path) -> None:
    assert latest_run_dir(tmp_path / "missing", "train") is None
    assert latest_run_dir(tmp_path, "train") is None
    (tmp_path / "train_010").mkdir()
    new_run_dir(tmp_path, "sample")
    (tmp_path / "train_002").mkdir()  # made later, but a lower number
    (tmp_path / "train_999.bak").mkdir()
    assert latest_run_dir(tmp_path, "train") == tmp_path / "train_010"
    assert latest_run_dir(tmp_path, "sample") == tmp_path / "sample_001"
    (tmp_path / "train_1000").mkdir()
    assert latest_run_dir(tmp_path, "train") == tmp_path / "train_1000"


def test_latest_run_dir_of_any_action_is_most_recent(tmp_path: Path) -> None:
    older, newer = tmp_path / "train_005", tmp_path / "sample_001"
    older.mkdir()
    newer.mkdir()
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    os.utime(newer, ns=(2_000_000_000, 2_000_000_000))
    assert latest_run_dir(tmp_path) == newer


def test_run_dirs_newest_first_lists_one_actions_runs_by_number(tmp_path: Path) -> None:
    for name in ("sample_002", "sample_010", "train_020", "sample_001"):
        (tmp_path / name).mkdir()
    assert run_dirs_newest_first(tmp_path, "sample") == [tmp_path / f"sample_{n:03d}" for n in (10, 2, 1)]
    assert run_dirs_newest_first(tmp_path / "missing", "sample") == []


HOLDER = """import fcntl, sys
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_run_folder_held_by_a_live_process_reads_as_held_and_is_free_once_that_process_is_killed(
        tmp_path: Path) -> None:
    """What lets a requeued Slurm job tell its own stopped run from the run of a job still under way."""
    run = new_run_dir(tmp_path, "sample")
    assert not run_is_held(run) and not (run / RUN_LOCK).exists()  # looking leaves no file behind
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / RUN_LOCK)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert run_is_held(run) and hold_run(run) is None
    finally:
        holder.kill()  # as a preemption would: no clean-up runs
        holder.wait()
    assert not run_is_held(run)
    with hold_run(run) as mine:
        assert mine is not None and run_is_held(run)  # a second open of the file, as another process's
    assert not run_is_held(run)


@pytest.mark.parametrize("where", ["a mount without flock", "a system without fcntl"])
def test_where_files_cannot_be_locked_every_run_reads_as_free(tmp_path: Path, monkeypatch, where) -> None:
    """Some cluster mounts (Lustre without the flock option) answer flock with an error, and Windows has no fcntl:
    runs go on unlocked there."""
    import errno
    import fcntl

    from guided_diffusion import run_folder

    def unsupported(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    if where == "a mount without flock":
        monkeypatch.setattr(fcntl, "flock", unsupported)
    else:
        monkeypatch.setattr(run_folder, "fcntl", None)
    run = new_run_dir(tmp_path, "train")
    with FileLock.take(run / RUN_LOCK) as first, FileLock.take(run / RUN_LOCK) as second:
        assert first is not None and second is not None
        assert not run_is_held(run)


# ---------------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------------


def test_write_json_keeps_key_order_and_indent(tmp_path: Path) -> None:
    path = tmp_path / "run" / "config.json"
    write_json(path, {"z": 1, "a": [1, 2], "data_dir": Path("datasets/demo"), "s": np.float32(1.5)})
    text = path.read_text()
    assert json.loads(text) == {"z": 1, "a": [1, 2], "data_dir": "datasets/demo", "s": 1.5}
    assert text.startswith('{\n  "z": 1,')
    write_json(path, {"b": 2})  # replaces the old file whole
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_write_json_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


# ---------------------------------------------------------------------------------------------------------------
# palette, colorize, to_uint8_image
# ---------------------------------------------------------------------------------------------------------------


def test_palette_has_256_distinct_colours_and_black_background() -> None:
    colours = palette(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [0, 0, 0]
    assert len({tuple(colour) for colour in colours.tolist()}) == 256


def test_palette_colours_are_saturated() -> None:
    colours = palette(256).astype(int)[1:]
    assert (colours.max(axis=1) - colours.min(axis=1)).min() >= 100


def test_palette_is_deterministic_prefix() -> None:
    assert np.array_equal(palette(300)[:21], palette(21))
    assert np.array_equal(palette(5), palette(5))
    assert len({tuple(colour) for colour in palette(1000).tolist()}) == 1000


def test_palette_rejects_zero_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        palette(0)


def test_colorize_maps_class_ids_to_palette() -> None:
    mask = np.array([[0, 1], [2, 1]], dtype=np.int64)
    image = colorize(mask, 3)
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    colours = palette(3)
    assert image[0, 0].tolist() == [0, 0, 0]
    assert image[0, 1].tolist() == colours[1].tolist() == image[1, 1].tolist()
    assert image[1, 0].tolist() == colours[2].tolist()


def test_colorize_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        colorize(np.array([[0, 3]]), 3)


def test_to_uint8_image_scales_clamps_and_transposes() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5]).reshape(1, 2, 3).expand(3, 2, 3)
    image = to_uint8_image(x)
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert image[:, :, 0].tolist() == [[0, 128, 255], [255, 0, 191]]
    assert to_uint8_image(torch.zeros(1, 4, 5)).shape == (4, 5, 3)


# ---------------------------------------------------------------------------------------------------------------
# SampleWriter
# ---------------------------------------------------------------------------------------------------------------


def _example(height: int = 8, width: int = 6, num_classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, num_classes, (height, width))
    real = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return sample, mask, real


def test_sample_writer_layout_uses_same_stem(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path, num_classes=4)
    sample, mask, real = _example()
    writer.write("img_0007", sample, mask, real)
    writer.write("mask_only", sample, mask, None)
    for folder in ("images", "labels", "colored_labels", "samples"):
        assert (tmp_path / folder).is_dir()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["img_0007.png", "mask_only.png"]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["img_0007.png", "mask_only.png"]
    assert sorted(p.name for p in (tmp_path / "colored_labels").iterdir()) == ["img_0007.png", "mask_only.png"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["img_0007.png"]


def test_sample_writer_files_round_trip(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path, num_classes=4)
    sample, mask, real = _example()
    writer.write("a", sample, mask, real)
    labels = np.asarray(Image.open(tmp_path / "labels" / "a.png"))
    assert labels.dtype == np.uint8 and np.array_equal(labels, mask)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / "a.png")), sample)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / "a.png")), real)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "colored_labels" / "a.png")), colorize(mask, 4))


def test_sample_writer_uses_uint16_labels_beyond_256_classes(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path, num_classes=300)
    sample, _, _ = _example()
    mask = np.arange(48).reshape(8, 6) * 6  # ids up to 282
    writer.write("many", sample, mask, None)
    labels = np.asarray(Image.open(tmp_path / "labels" / "many.png")).astype(np.int64)
    assert np.array_equal(labels, mask)


def test_sample_writer_refuses_overwrite(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path, num_classes=4)
    sample, mask, real = _example(seed=1)
    writer.write("a", sample, mask, real)
    before = (tmp_path / "samples" / "a.png").read_bytes()
    other_sample, other_mask, _ = _example(seed=2)
    with pytest.raises(FileExistsError, match="a.png already exists"):
        writer.write("a", other_sample, other_mask, None)
    assert (tmp_path / "samples" / "a.png").read_bytes() == before


def test_sample_writer_rejects_mismatched_mask(tmp_path: Path) -> None:
    writer = SampleWriter(tmp_path, num_classes=4)
    sample, _, _ = _example()
    with pytest.raises(ValueError, match="does not match"):
        writer.write("a", sample, np.zeros((4, 4), dtype=np.int64), None)


# ---------------------------------------------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------------------------------------------


def test_grid_size_and_cells(tmp_path: Path) -> None:
    rows = [_example(16, 12, seed=seed) for seed in range(3)]
    grid_rows = [(mask, real if i != 1 else None, sample) for i, (sample, mask, real) in enumerate(rows)]
    path = tmp_path / "grid.png"
    write_grid(path, grid_rows, num_classes=4)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 16 + 2 * 2, 3 * 12 + 2 * 2, 3)
    sample0, mask0, real0 = rows[0]
    assert np.array_equal(grid[:16, :12], colorize(mask0, 4))
    assert np.array_equal(grid[:16, 14:26], real0)
    assert np.array_equal(grid[:16, 28:40], sample0)
    assert (grid[18:34, 14:26] == 128).all()  # grey placeholder for a missing real image
    assert (grid[16:18] == 255).all() and (grid[:, 12:14] == 255).all()  # separators


def test_grid_keeps_at_most_max_rows(tmp_path: Path) -> None:
    sample, mask, real = _example(8, 8)
    path = tmp_path / "grid.png"
    write_grid(path, [(mask, real, sample)] * 20, num_classes=4, max_rows=8)
    assert Image.open(path).size == (3 * 8 + 4, 8 * 8 + 7 * 2)


# ---------------------------------------------------------------------------------------------------------------
# CsvLog
# ---------------------------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_csv_log_writes_header_once_and_flushes(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    log = CsvLog(path, ["epoch", "loss"])
    log.write({"epoch": 1, "loss": 0.5})
    assert _read_csv(path) == [["epoch", "loss"], ["1", "0.5"]]  # readable before close
    log.write({"epoch": 2})
    log.close()
    assert _read_csv(path) == [["epoch", "loss"], ["1", "0.5"], ["2", ""]]


def test_csv_log_resume_appends_without_second_header(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    with CsvLog(path, ["epoch", "loss"]) as log:
        log.write({"epoch": 1, "loss": 0.5})
    with CsvLog(path, ["epoch", "loss"]) as log:
        log.write({"epoch": 2, "loss": 0.25})
    assert _read_csv(path) == [["epoch", "loss"], ["1", "0.5"], ["2", "0.25"]]


def test_csv_log_takes_columns_from_first_row(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    with CsvLog(path, []) as log:
        log.write({"step": 10, "lr": 0.001})
        log.write({"lr": 0.002, "step": 20})
    assert _read_csv(path) == [["step", "lr"], ["10", "0.001"], ["20", "0.002"]]


def test_csv_log_resume_after_cut_row_starts_new_line(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n1,0.5\n2,0.")  # a process killed while writing row 2
    with CsvLog(path, ["epoch", "loss"]) as log:
        log.write({"epoch": 2, "loss": 0.25})
    assert _read_csv(path)[-1] == ["2", "0.25"]


def test_csv_log_rejects_different_columns_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    with CsvLog(path, ["epoch", "loss"]) as log:
        log.write({"epoch": 1, "loss": 0.5})
    with pytest.raises(ValueError, match="has columns"):
        CsvLog(path, ["epoch", "loss", "lr"])


def test_csv_log_rejects_unknown_keys(tmp_path: Path) -> None:
    with CsvLog(tmp_path / "log.csv", ["epoch"]) as log:
        with pytest.raises(ValueError, match="no columns"):
            log.write({"epoch": 1, "extra": 2})


def test_legend_shows_each_class_colour_once_per_row(tmp_path):
    from guided_diffusion.run_folder import palette, write_legend
    names = ["background", "blowhole", "break", "crack"]
    write_legend(tmp_path / "legend.png", names, swatch=10)
    image = np.asarray(Image.open(tmp_path / "legend.png").convert("RGB"))
    assert image.shape[0] == len(names) * 14 + 4
    for i, colour in enumerate(palette(len(names))):
        centre = image[4 + i * 14 + 5, 4 + 5]  # middle of row i's swatch
        assert tuple(centre) == tuple(int(c) for c in colour)

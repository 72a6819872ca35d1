"""Tests for evaluation/: metrics, mixes, segmenter training, label alignment, FID plumbing, config, errors, and
evaluate.sh end to end on magnetic-tile with a fake sample run folder (real masks + real images as "samples")."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MAGNETIC_TILE
from evaluation.evaluate.cli import main as evaluate_main
from evaluation.evaluate.config import config_from_dict
from evaluation.fid import image_distance, load_inception
from evaluation.image_sets import load_pairs
from evaluation.segmenter.metrics import segmentation_metrics
from evaluation.evaluate.mixes import Mix, chosen_indices, parse_mix, parse_mixes
from evaluation.segmenter.model import SegmenterSpec, TrainSettings, build_segmenter, train_segmenter
from evaluation.segmenter.run import Scoring, score
from guided_diffusion.data import index_dataset
from guided_diffusion.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY_ENCODER = "tu-mobilenetv3_small_050"  # 1-2 M parameters: a few training steps take a fraction of a second
NUM_CLASSES = 6  # magnetic-tile: background + 5 defect kinds


# ---------------------------------------------------------------------------------------------------------------
# helpers


def make_sample_run(folder: Path, pairs, size: int = 64, num_classes: int = NUM_CLASSES) -> Path:
    """A fake `main.py sample` run folder: real masks in labels/, their real images in samples/ (both png)."""
    for name in ("samples", "labels", "images", "colored_labels"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, pair in enumerate(pairs):
        stem = f"{i:05d}_{pair.stem}"
        Image.open(pair.mask).resize((size, size), Image.Resampling.NEAREST).save(folder / "labels" / f"{stem}.png")
        Image.open(pair.image).convert("RGB").resize((size, size)).save(folder / "samples" / f"{stem}.png")
    (folder / "config.json").write_text(json.dumps({"num_classes": num_classes, "image_size": size,
                                                    "data_dir": "datasets/magnetic-tile"}))
    return folder


def make_small_dataset(folder: Path, index, num_train: int = 6, num_test: int = 3) -> Path:
    """A few magnetic-tile pairs copied into a dataset folder of the same layout (with its classes.json)."""
    for split, pairs in (("train", index.train[:num_train]), ("test", index.test[:num_test])):
        for kind in ("images", "masks"):
            (folder / split / kind).mkdir(parents=True)
        for pair in pairs:
            shutil.copy(pair.image, folder / split / "images" / pair.image.name)
            shutil.copy(pair.mask, folder / split / "masks" / pair.mask.name)
    shutil.copy(MAGNETIC_TILE / "classes.json", folder / "classes.json")
    return folder


def largest_defects(index, per_class: int):
    """The magnetic-tile train pairs with the largest area of each defect class, grouped by class."""
    areas = {c: [] for c in range(1, NUM_CLASSES)}
    for pair in index.train:
        mask = np.asarray(Image.open(pair.mask))
        for c in areas:
            areas[c].append(((mask == c).mean(), pair.stem, pair))
    return [pair for c in areas for _, _, pair in sorted(areas[c], key=lambda t: (-t[0], t[1]))[:per_class]]


@pytest.fixture(scope="module")
def tile_index():
    return index_dataset(MAGNETIC_TILE, "multi-class", NUM_CLASSES)


@pytest.fixture(scope="module")
def defect_pairs(tile_index):
    return largest_defects(tile_index, per_class=2)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_metrics_match_a_hand_computed_case() -> None:
    # two 2x4 images, classes 0..3; class 3 appears nowhere
    target = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]],
                       [[0, 0, 0, 0], [2, 2, 0, 0]]])
    pred = np.array([[[0, 0, 1, 0], [0, 0, 1, 1]],
                     [[0, 0, 0, 0], [2, 0, 0, 0]]])
    m = segmentation_metrics(pred, target, num_classes=4)
    # class 0: TP 10, FP 2 (one missed 1, one missed 2), FN 0 -> 10/12; class 1: 3/4; class 2: 1/2; class 3: none
    assert m.class_iou[:3] == pytest.approx((10 / 12, 3 / 4, 1 / 2))
    assert math.isnan(m.class_iou[3]) and math.isnan(m.class_f1[3])
    assert m.miou == pytest.approx((10 / 12 + 3 / 4 + 1 / 2) / 3)
    assert m.miou_no_bg == pytest.approx((3 / 4 + 1 / 2) / 2)
    # per image: class 0 is 4/5 in image 1 and 6/7 in image 2; classes 1 and 2 appear in one image each
    assert m.class_image_iou[:3] == pytest.approx(((4 / 5 + 6 / 7) / 2, 3 / 4, 1 / 2))
    # F1 = 2TP / (2TP + FP + FN)
    assert m.class_f1[:3] == pytest.approx((20 / 22, 6 / 7, 2 / 3))
    assert m.accuracy == pytest.approx(14 / 16)


def test_metrics_skip_pixels_with_the_ignore_index() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(2, 8, 8))
    pred = rng.integers(0, 3, size=(2, 8, 8))
    ignored = rng.random((2, 8, 8)) < 0.3
    with_ignored = np.where(ignored, 255, target)
    m = segmentation_metrics(pred, with_ignored, num_classes=3, ignore_index=255)
    # the same metrics on the kept pixels only (one flat "image" per image)
    kept = segmentation_metrics([p[~i][None] for p, i in zip(pred, ignored)],
                                [t[~i][None] for t, i in zip(target, ignored)], num_classes=3)
    assert m.class_iou == pytest.approx(kept.class_iou)
    assert m.class_image_iou == pytest.approx(kept.class_image_iou)
    assert m.accuracy == pytest.approx(kept.accuracy)
    assert m.num_pixels == int((~ignored).sum())


# ---------------------------------------------------------------------------------------------------------------
# mixes


def test_mix_names_follow_isdm() -> None:
    assert parse_mix("R100F300") == Mix(100, 300)
    assert parse_mix("rall").name == "RALLF000"
    assert parse_mix("FALL").name == "R000FALL"
    assert parse_mix("R000F50").name == "R000F050"
    assert parse_mix("RALLF200").counts(num_real=444, num_synthetic=500) == (444, 200)


@pytest.mark.parametrize("text, message", [
    ("R000", "has no training images"),
    ("X100", "is not a mix name"),
    ("R10F", "is not a mix name"),
])
def test_bad_mix_names_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_mix(text)


def test_the_same_mix_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="'RALLF000' is the same mix as 'RALL'"):
        parse_mixes(["RALL", "RALLF000"])


def test_a_mix_asking_for_more_images_than_exist_is_refused() -> None:
    with pytest.raises(ConfigError, match="R500F000 asks for 500 real images but the train split has 444"):
        parse_mix("R500").counts(444, 0)
    with pytest.raises(ConfigError, match="asks for 64 synthetic images but the sample folders hold 8"):
        parse_mix("RALLF064").counts(444, 8)


def test_mix_subsets_are_nested_and_depend_on_the_seed_only() -> None:
    small, large = chosen_indices(10, 100, seed=3, kind="real"), chosen_indices(40, 100, seed=3, kind="real")
    assert set(small) <= set(large)
    assert chosen_indices(10, 100, seed=3, kind="real") == small
    assert chosen_indices(10, 100, seed=4, kind="real") != small


# ---------------------------------------------------------------------------------------------------------------
# segmenter


def _tiny_set(num: int = 4, size: int = 32, num_classes: int = 3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, num_classes, size=(num, size, size)).astype(np.uint8)
    return images, masks


def test_training_is_repeatable_for_a_seed_on_cpu() -> None:
    images, masks = _tiny_set()
    spec = SegmenterSpec("fpn", 3, encoder=TINY_ENCODER)

    def weights(seed: int) -> torch.Tensor:
        model, _ = train_segmenter(images, masks, spec, TrainSettings(steps=2, batch_size=2, seed=seed),
                                   progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first = weights(0)
    assert torch.equal(first, weights(0))
    assert not torch.equal(first, weights(1))


def test_training_skips_pixels_with_the_ignore_index() -> None:
    images, masks = _tiny_set()
    masks[:, :16] = 255
    spec = SegmenterSpec("deeplabv3plus", 3, encoder=TINY_ENCODER)
    _, loss = train_segmenter(images, masks, spec, TrainSettings(steps=2, batch_size=2, ignore_index=255),
                              progress=False)
    assert math.isfinite(loss)
    with pytest.raises(ValueError, match=r"mask values \[255\] are not class ids 0..2"):
        train_segmenter(images, masks, spec, TrainSettings(steps=1, batch_size=2), progress=False)


def test_encoder_weights_load_from_a_local_file(tmp_path: Path) -> None:
    source = build_segmenter(SegmenterSpec("unet", 3, encoder=TINY_ENCODER), seed=5)
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pt")
    loaded = build_segmenter(SegmenterSpec("unet", 3, TINY_ENCODER, str(tmp_path / "encoder.pt")), seed=0)
    for name, value in source.encoder.state_dict().items():
        assert torch.equal(value, loaded.encoder.state_dict()[name])
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: does not fit encoder .*missing"):
        build_segmenter(SegmenterSpec("unet", 3, TINY_ENCODER, str(tmp_path / "other.pt")))


def test_an_unknown_encoder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="key 'encoder': 'resnet7' cannot be used with fpn"):
        build_segmenter(SegmenterSpec("fpn", 3, encoder="resnet7"))


# ---------------------------------------------------------------------------------------------------------------
# label alignment


def test_label_alignment_is_high_for_real_pairs_and_near_chance_for_shuffled_pairs(defect_pairs) -> None:
    data = load_pairs(defect_pairs, "multi-class", 64, "resize", "defects")  # 2 images per defect class
    spec = SegmenterSpec("fpn", NUM_CLASSES, encoder=TINY_ENCODER)
    model, _ = train_segmenter(data.images, data.masks, spec,
                               TrainSettings(steps=40, batch_size=5, lr=1e-2, augment=False, seed=0), progress=False)
    aligned = score(model, data.images, data.masks, Scoring(NUM_CLASSES))
    # shift by one class group: every image gets the mask of an image with another defect class
    shuffled_masks = np.roll(data.masks, 2, axis=0)
    shuffled = score(model, data.images, shuffled_masks, Scoring(NUM_CLASSES))
    # chance: even a perfect segmenter (predicting the true masks) scores this against shuffled masks
    chance = segmentation_metrics(data.masks, shuffled_masks, NUM_CLASSES)
    assert aligned.miou_no_bg > 0.4
    assert shuffled.miou_no_bg <= chance.miou_no_bg + 0.05
    assert aligned.miou > shuffled.miou + 0.3


# ---------------------------------------------------------------------------------------------------------------
# FID / KID


def test_fid_is_small_for_one_distribution_and_grows_with_a_shift() -> None:
    generator = torch.Generator().manual_seed(0)
    real, same, shifted = (torch.randn(200, 8, generator=generator) for _ in range(3))
    near, far = image_distance(real, same), image_distance(real, shifted + 1.0)
    assert near.fid < 1.0 < far.fid
    assert far.fid == pytest.approx(8.0, rel=0.2)  # |mean shift|^2 = 8 dominates
    assert near.kid_mean < far.kid_mean


def test_inception_weights_must_be_an_inception_state_dict(tmp_path: Path) -> None:
    from torchvision.models.inception import Inception3

    torch.save(Inception3(aux_logits=True, init_weights=False).state_dict(), tmp_path / "inception.pth")
    extractor = load_inception(tmp_path / "inception.pth")
    assert extractor(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 2048)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="other.pth is not an Inception-v3 state dict"):
        load_inception(tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="missing.pth not found"):
        load_inception(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------------
# config and user errors (one line, exit status 2, nothing written)


def test_config_keys_are_checked_strictly() -> None:
    with pytest.raises(ConfigError, match="unknown key 'sample_dir' for evaluate \\(did you mean 'sample_dirs'"):
        config_from_dict({"data_dir": "d", "sample_dir": ["x"]})
    with pytest.raises(ConfigError, match="key 'image_size' must be a multiple of 32"):
        config_from_dict({"data_dir": "d", "image_size": 100})
    with pytest.raises(ConfigError, match="key 'models': unknown segmenter 'segformer'"):
        config_from_dict({"data_dir": "d", "models": ["segformer"]})
    assert config_from_dict({"data_dir": "d", "sample_dirs": "one", "models": ["Unet++"]}).sample_dirs == ["one"]


def test_command_line_options_override_the_config_file(tmp_path: Path, capsys) -> None:
    config = tmp_path / "evaluate.json"
    config.write_text(json.dumps({"data_dir": "a", "steps": 10, "seeds": [0]}))
    assert evaluate_main(["-c", str(config), "--steps", "20", "--set", "seeds=[1, 2]", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["data_dir"], resolved["steps"], resolved["seeds"]) == ("a", 20, [1, 2])


def test_background_class_and_ignore_index_come_from_the_command_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "evaluate.json"
    config.write_text(json.dumps({"data_dir": "a", "background_class": 0}))
    assert evaluate_main(["-c", str(config), "--background-class", "none", "--ignore-index", "255", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["background_class"], resolved["ignore_index"]) == (None, 255)
    assert evaluate_main(["-c", str(config), "--background-class", "3", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["background_class"] == 3


def test_an_ignore_index_that_is_a_class_id_is_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "evaluate.json"
    config.write_text(json.dumps({"data_dir": "a", "num_classes": 6, "ignore_index": 4}))
    assert evaluate_main(["-c", str(config), "--dry-run"]) == 2
    assert "key 'ignore_index' 4 is a class id (0..5)" in capsys.readouterr().err


def test_a_void_label_in_real_masks_is_skipped_by_training_and_metrics(tmp_path: Path, tile_index, capsys) -> None:
    from PIL import Image
    data = make_small_dataset(tmp_path / "tiles", tile_index)
    for mask in (data / "test" / "masks").iterdir():
        pixels = np.array(Image.open(mask))
        pixels[:4, :4] = 255  # a void corner
        Image.fromarray(pixels).save(mask)
    args = ["--data-dir", str(data), "--mixes", "RALLF000", "--seeds", "0", "--set", "label_alignment=false",
            "--root-log-dir", str(tmp_path / "out"), "--image-size", "32", "--steps", "1", "--batch-size", "2",
            "--encoder", TINY_ENCODER, "--models", "fpn"]
    assert evaluate_main(args) == 2  # 255 is no class id of magnetic-tile
    err = capsys.readouterr().err
    assert "masks with values outside 0..5" in err and "ignore_index 255" in err
    assert evaluate_main(args + ["--ignore-index", "255"]) == 0


@pytest.fixture
def small_inputs(tmp_path: Path, tile_index):
    """A 6 + 3 pair copy of magnetic-tile and a fake sample run of 4 pairs."""
    data = make_small_dataset(tmp_path / "tiles", tile_index)
    samples = make_sample_run(tmp_path / "Results" / "sample_001", tile_index.train[:4])
    return data, samples


def _run_error(tmp_path: Path, capsys, args: list[str]) -> str:
    """Run the evaluation CLI expecting a user error; return its one line and check that nothing was written."""
    root = tmp_path / "out"
    code = evaluate_main(args + ["--root-log-dir", str(root), "--image-size", "32", "--steps", "1",
                                 "--encoder", TINY_ENCODER, "--models", "fpn"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not root.exists()
    return err


def test_error_for_a_missing_sample_folder(tmp_path: Path, capsys, small_inputs) -> None:
    data, _ = small_inputs
    err = _run_error(tmp_path, capsys, ["--data-dir", str(data), "--samples", str(tmp_path / "nope")])
    assert "sample folder" in err and "nope: not found" in err


def test_error_for_a_missing_dataset_folder(tmp_path: Path, capsys, small_inputs) -> None:
    _, samples = small_inputs
    err = _run_error(tmp_path, capsys, ["--data-dir", str(tmp_path / "nodata"), "--samples", str(samples),
                                        "--num-classes", "6"])
    assert "nodata: folder not found" in err


def test_error_for_a_sample_folder_with_other_classes(tmp_path: Path, capsys, small_inputs) -> None:
    data, samples = small_inputs
    (samples / "config.json").write_text(json.dumps({"num_classes": 4}))
    err = _run_error(tmp_path, capsys, ["--data-dir", str(data), "--samples", str(samples)])
    assert "sampled with num_classes 4 (its config.json) but the dataset has 6 classes" in err


def test_error_for_void_labels_of_a_sample_folder_that_evaluation_would_not_skip(tmp_path: Path, capsys,
                                                                                small_inputs) -> None:
    data, samples = small_inputs
    (samples / "config.json").write_text(json.dumps({"num_classes": 6, "ignore_index": 255}))
    err = _run_error(tmp_path, capsys, ["--data-dir", str(data), "--samples", str(samples)])
    assert ("its labels keep void pixels of value 255 (sampled with ignore_index 255); set key 'ignore_index' to 255 "
            "so that evaluation skips them") in err


def test_error_for_label_ids_outside_the_dataset_classes(tmp_path: Path, capsys, small_inputs) -> None:
    data, samples = small_inputs
    label = sorted((samples / "labels").iterdir())[0]
    Image.fromarray(np.full((64, 64), 7, dtype=np.uint8)).save(label)
    err = _run_error(tmp_path, capsys, ["--data-dir", str(data), "--samples", str(samples)])
    assert f"labels/{label.name}: class ids [7] outside the dataset's 0..5" in err


def test_error_for_a_mix_asking_for_more_images_than_exist(tmp_path: Path, capsys, small_inputs) -> None:
    data, samples = small_inputs
    err = _run_error(tmp_path, capsys, ["--data-dir", str(data), "--samples", str(samples),
                                        "--mixes", "RALLF000", "RALLF005"])
    assert "RALLF005 asks for 5 synthetic images but the sample folders hold 4" in err


def test_error_for_a_sample_and_label_of_different_sizes(tmp_path: Path, capsys, small_inputs) -> None:
    data, samples = small_inputs
    sample = sorted((samples / "samples").iterdir())[1]
    Image.open(sample).resize((48, 64)).save(sample)
    err = _run_error(tmp_path, capsys, ["--data-dir", str(data), "--samples", str(samples)])
    assert f"{sample.stem}: sample 48x64 but label 64x64" in err


def test_error_for_synthetic_mixes_without_sample_folders(tmp_path: Path, capsys, small_inputs) -> None:
    data, _ = small_inputs
    err = _run_error(tmp_path, capsys, ["--data-dir", str(data), "--mixes", "RALLF000", "FALL"])
    assert "R000FALL use synthetic images but no sample folder was given" in err


# ---------------------------------------------------------------------------------------------------------------
# one segmenter loop: evaluate.sh's numbers are those of segmenter/run.py


def test_evaluate_trains_and_scores_each_segmenter_by_the_one_segmenter_run(tmp_path: Path, small_inputs) -> None:
    """A run of evaluate.sh is `train_and_test` with evaluate's options: no validation set (the last weights),
    fp32, the mix's items pooled, the test split and each sample folder (label alignment) scored alike."""
    from evaluation.evaluate.pipeline import mix_training_set, prepare, run_evaluation
    from evaluation.segmenter.run import train_and_test

    data, samples = small_inputs
    config = config_from_dict({"data_dir": str(data), "sample_dirs": [str(samples)], "mixes": ["RALLF000"],
                               "seeds": [1], "models": ["fpn"], "encoder": TINY_ENCODER, "image_size": 32,
                               "steps": 3, "batch_size": 2, "root_log_dir": str(tmp_path / "out")})
    run_dir = run_evaluation(config, log=lambda *_: None, progress=False)
    with open(run_dir / "metrics.csv", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    with open(run_dir / "alignment.csv", newline="") as handle:
        [aligned] = list(csv.DictReader(handle))

    inputs = prepare(config, log=lambda *_: None)
    images, masks = mix_training_set(inputs, inputs.mixes[0], seed=1)
    run = train_and_test(images, masks, SegmenterSpec("fpn", NUM_CLASSES, TINY_ENCODER),
                         TrainSettings(steps=3, batch_size=2, lr=1e-3, weight_decay=1e-4, augment=True, seed=1),
                         Scoring(NUM_CLASSES), test=inputs.test, generated=inputs.synthetic, progress=False)
    for name in ("miou", "miou_no_bg", "image_miou", "f1", "iou_blowhole"):  # as written: exact, NaN alike
        assert row[name] == str(run.test.row(inputs.class_names)[name]), name
        assert aligned[name] == str(run.alignment["sample_001"].row(inputs.class_names)[name]), name
    assert row["final_loss"] == str(run.final_loss)


# ---------------------------------------------------------------------------------------------------------------
# end to end: the bash script on magnetic-tile


def test_evaluate_sh_runs_two_mixes_end_to_end(tmp_path: Path, defect_pairs) -> None:
    make_sample_run(tmp_path / "Results" / "sample_001", defect_pairs[:6])
    root = tmp_path / "runs"
    command = [str(REPO / "evaluation" / "evaluate.sh"), "--data-dir", str(MAGNETIC_TILE),
               "--samples", str(tmp_path / "Results"),  # a folder of runs: its newest sample_NNN is used
               "--mixes", "RALLF000", "RALLF006", "--seeds", "0", "1", "--models", "fpn",
               "--encoder", TINY_ENCODER, "--image-size", "64", "--steps", "3", "--batch-size", "4",
               "--root-log-dir", str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    run = root / "evaluate_001"
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["mix"], r["seed"]) for r in rows] == [("RALLF000", "0"), ("RALLF000", "1"),
                                                     ("RALLF006", "0"), ("RALLF006", "1")]
    assert {r["real_images"] for r in rows} == {"444"}
    assert [r["synthetic_images"] for r in rows] == ["0", "0", "6", "6"]
    assert all(0.0 <= float(r["miou"]) <= 1.0 for r in rows)
    assert "iou_blowhole" in rows[0] and "image_iou_uneven" in rows[0] and "f1_no_bg" in rows[0]

    summary = (run / "summary.md").read_text()
    for mix in ("RALLF000", "RALLF006"):
        assert f"| fpn | {mix} | 444 |" in summary
        assert f"| fpn | {mix} | 444 |" in result.stdout  # the table printed at the end
    assert "±" in summary
    with open(run / "summary.csv", newline="") as handle:
        assert [r["mix"] for r in csv.DictReader(handle)] == ["RALLF000", "RALLF006"]
    for plot in ("miou_vs_synthetic.png", "per_class_iou.png"):
        assert Image.open(run / plot).size[0] > 300
    with open(run / "alignment.csv", newline="") as handle:
        alignment = list(csv.DictReader(handle))
    assert [(r["sample_folder"], r["seed"], r["images"]) for r in alignment] == [("sample_001", "0", "6"),
                                                                                 ("sample_001", "1", "6")]
    assert "FID skipped (no local Inception weights given)" in result.stdout
    assert json.loads((run / "config.json").read_text())["mixes_resolved"]["RALLF006"] == {"real": 444,
                                                                                          "synthetic": 6}


def test_defect_contrast_is_the_class_mean_minus_its_ring_mean_per_image():
    from evaluation.contrast import class_contrast

    images = np.full((2, 40, 40), 200, np.uint8)
    masks = np.zeros((2, 40, 40), np.int64)
    images[0, 10:20, 10:20], masks[0, 10:20, 10:20] = 50, 1  # a dark square: -150
    images[1, 5:9, 5:9], masks[1, 5:9, 5:9] = 230, 1  # a bright one: +30
    masks[1, 30:40, 30:40] = 255  # ignored pixels far from it change nothing
    rgb = np.repeat(images[..., None], 3, axis=-1)  # colour images are read as the mean of their channels
    found = class_contrast(rgb, masks, [1, 2], ignore_index=255)
    assert found[1].images == 2 and found[1].mean == pytest.approx(-60.0) and found[1].std == pytest.approx(90.0)
    assert found[2].images == 0 and found[2].text() == "–"  # a class no image holds
    images[0, 10:20, 26:29] = 0  # a ring pixel darker: the ring's mean falls, the contrast rises
    assert class_contrast(images[:1], masks[:1], [1])[1].mean > -150.0


def test_defect_roughness_is_the_mean_distance_to_the_3x3_median_over_the_class_pixels():
    from evaluation.contrast import class_roughness, image_set_look

    images = np.full((2, 12, 12), 100, np.uint8)
    masks = np.zeros((2, 12, 12), np.int64)
    masks[:, 4:8, 4:8] = 1
    images[1, 5, 5] = 200  # one salt pixel in the class: its 3x3 median is 100, every other pixel's still 100
    found = class_roughness(np.repeat(images[..., None], 3, axis=-1), masks, [0, 1, 2])
    assert found[1].images == 2 and found[2].images == 0 and found[2].text(signed=False) == "–"
    assert found[1].mean == pytest.approx((0 + 100 / 16) / 2) and found[1].std == pytest.approx(100 / 32)
    assert found[0].mean == 0.0  # the salt pixel is no background pixel's neighbour
    # the report's flag: the salted set is rougher than the flat one on class 1 only
    flat, salted = (image_set_look(images[i:i + 1], masks[i:i + 1], [0, 1], background_class=0) for i in (0, 1))
    assert list(salted.contrast) == [1] and list(salted.roughness) == [0, 1]
    assert salted.rougher_than(flat) == [1] and flat.rougher_than(salted) == []


def test_a_synthetic_ratio_fixes_each_batchs_share_and_the_last_steps_are_real_only():
    from evaluation.segmenter.model import mixed_batch_order

    synthetic = np.array([False] * 6 + [True] * 10)
    batches = list(mixed_batch_order(synthetic, batch_size=8, steps=10, seed=0, ratio=0.25, real_steps=3))
    assert [int(synthetic[b].sum()) for b in batches] == [2] * 7 + [0] * 3
    real_drawn = np.concatenate([b[~synthetic[b]] for b in batches[:3]])
    assert sorted(real_drawn[:6]) == list(range(6))  # each stream cycles through all its items before repeating
    assert all(len(b) == 8 for b in batches)
    pooled = list(mixed_batch_order(synthetic, 8, 4, 0, ratio=None, real_steps=0))
    from evaluation.segmenter.model import batch_order
    assert all(np.array_equal(a, b) for a, b in zip(pooled, batch_order(16, 8, 4, 0)))  # the pooled order of before


def test_a_synthetic_weight_of_zero_trains_on_the_real_rows_loss_alone():
    from evaluation.segmenter.model import _weighted_loss, segmentation_loss

    torch.manual_seed(0)
    logits, masks = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8))
    synthetic = np.array([False, True, False, True])
    loss = segmentation_loss(3)
    assert torch.allclose(_weighted_loss(loss, logits, masks, synthetic, 0.0), loss(logits[[0, 2]], masks[[0, 2]]))
    halves = (loss(logits[[0, 2]], masks[[0, 2]]) + 3 * loss(logits[[1, 3]], masks[[1, 3]])) / 4
    assert torch.allclose(_weighted_loss(loss, logits, masks, synthetic, 3.0), halves)


def test_the_synthetic_data_keys_train_a_segmenter_and_refuse_items_that_are_all_real():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (12, 32, 32)).astype(np.uint8)
    synthetic = np.arange(12) >= 8
    settings = TrainSettings(steps=3, batch_size=4, synthetic_ratio=0.5, synthetic_weight=0.5,
                             real_finetune_share=0.34)
    model, loss = train_segmenter(images, masks, SegmenterSpec("fpn", 3), settings, progress=False,
                                  synthetic=synthetic)
    assert math.isfinite(loss)
    with pytest.raises(ValueError, match="need real and synthetic items"):
        train_segmenter(images, masks, SegmenterSpec("fpn", 3), settings, progress=False,
                        synthetic=np.zeros(12, bool))

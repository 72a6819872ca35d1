"""FreeMask's measures: filtering badly synthesised regions (evaluation/filter.sh) and hardness-aware mask selection.

The filter tests run on a toy dataset a tiny scorer learns in seconds: grey tiles with red squares (class 1) and
blue squares (class 2). A fake sample run holds fresh toy pairs, half of them intact and half corrupted by giving
each image the mask of another image (the generator "ignored its mask").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.evaluate.cli import main as evaluate_main
from evaluation.filter import main as filter_main
from evaluation.freemask import (FilterSettings, ScorerSettings, class_loss_stats, ignored_fraction,
                                 ignored_pixels, load_or_train_scorer, mask_hardness, measure_hardness, scorer_key,
                                 training_command)
from evaluation.image_sets import IGNORE_INDEX, index_sample_folder
from evaluation.segmenter.metrics import segmentation_metrics
from evaluation.segmenter.model import segmentation_loss
from guided_diffusion.balance import greedy_selection
from guided_diffusion.config import config_from_dict
from guided_diffusion.errors import CheckpointError, ConfigError
from guided_diffusion.sampling.hardness import draw_by_hardness, hardness_weights, write_selection_reports
from guided_diffusion.sampling.sample import TrainedWith, mask_splits, select_masks

TINY_ENCODER = "tu-mobilenetv3_small_050"
SIZE = 32
COLOURS = {1: (200, 40, 40), 2: (40, 60, 210)}  # class id -> RGB of its squares
SCORER = {"encoder": TINY_ENCODER, "steps": 60, "batch_size": 8, "lr": 0.01}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def toy_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A grey noisy 32 px tile with one or two coloured squares, and its class-id mask."""
    image = np.clip(rng.normal(128, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for class_id in rng.permutation([1, 2])[: rng.integers(1, 3)]:
        side = int(rng.integers(8, 14))
        top, left = rng.integers(0, SIZE - side, size=2)
        image[top:top + side, left:left + side] = COLOURS[int(class_id)]
        mask[top:top + side, left:left + side] = class_id
    return image, mask


def write_toy_dataset(root: Path, num_train: int = 24, num_test: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("test", num_test)):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
        for i in range(count):
            image, mask = toy_pair(rng)
            Image.fromarray(image).save(root / split / "images" / f"{split}_{i:03d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{split}_{i:03d}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "red", "blue"]}))
    return root


def write_toy_samples(folder: Path, num_intact: int = 12, num_corrupted: int = 12, seed: int = 1) -> Path:
    """A fake sample run: stems intact_NN keep their own mask, corrupt_NN get the mask of another image."""
    rng = np.random.default_rng(seed)
    for name in ("samples", "labels"):
        (folder / name).mkdir(parents=True)
    pairs = [toy_pair(rng) for _ in range(num_intact + num_corrupted)]
    corrupted = [pairs[num_intact + (i + 1) % num_corrupted][1] for i in range(num_corrupted)]
    for i, (image, mask) in enumerate(pairs):
        stem = f"intact_{i:02d}" if i < num_intact else f"corrupt_{i - num_intact:02d}"
        Image.fromarray(image).save(folder / "samples" / f"{stem}.png")
        Image.fromarray(mask if i < num_intact else corrupted[i - num_intact]).save(folder / "labels" / f"{stem}.png")
    (folder / "config.json").write_text(json.dumps({"num_classes": 3, "image_size": SIZE}))
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy dataset and a scorer cache that holds its scorer (trained once for the module)."""
    root = tmp_path_factory.mktemp("toy")
    data = write_toy_dataset(root / "data")
    settings = ScorerSettings.from_dict({**SCORER, "image_size": SIZE})
    load_or_train_scorer(data, "multi-class", 3, settings, root / "scorers", True, log=lambda _: None,
                         progress=False)
    return data, root / "scorers"


def filter_args(data: Path, scorers: Path, *samples: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--data-dir", str(data), "--samples", *map(str, samples), "--scorer-dir", str(scorers),
            "--scorer-encoder", TINY_ENCODER, "--scorer-steps", str(SCORER["steps"]), "--scorer-lr",
            str(SCORER["lr"]), "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------------------------
# filtering


def test_filter_ignores_and_drops_far_more_of_the_corrupted_pairs(toy, tmp_path, capsys) -> None:
    data, scorers = toy
    samples = write_toy_samples(tmp_path / "sample_001")
    assert filter_main(filter_args(data, scorers, samples, extra=("--max-ignored-fraction", "0.3"))) == 0
    report = json.loads((samples / "filter.json").read_text())
    assert report["settings"] == {"k": 1.0, "max_ignored_fraction": 0.3, "drop_basis": "foreground"}
    assert report["scorer"]["trained_now"] is False  # the module's cached scorer
    fraction = {row["stem"]: row["ignored_fraction"] for row in report["per_image"]}
    intact = np.mean([v for stem, v in fraction.items() if stem.startswith("intact")])
    corrupt = np.mean([v for stem, v in fraction.items() if stem.startswith("corrupt")])
    assert corrupt > 3 * intact and corrupt > 0.3
    dropped = report["dropped"]
    assert sum(stem.startswith("corrupt") for stem in dropped) >= 6
    assert sum(stem.startswith("intact") for stem in dropped) <= 1

    # labels_filtered: the raw label with 255 exactly where pixels were ignored
    stem = "corrupt_00"
    raw = np.asarray(Image.open(samples / "labels" / f"{stem}.png"))
    filtered = np.asarray(Image.open(samples / "labels_filtered" / f"{stem}.png"))
    kept = filtered != IGNORE_INDEX
    assert np.array_equal(filtered[kept], raw[kept])
    assert (~kept).mean() == pytest.approx(ignored_fraction(~kept, raw, "all"))
    assert sum(c["ignored_pixels"] for c in report["classes"]) == sum(
        int((np.asarray(Image.open(p)) == IGNORE_INDEX).sum()) for p in (samples / "labels_filtered").iterdir())
    assert Image.open(samples / "filter.png").size[0] > 500
    assert "dropped" in capsys.readouterr().out


def test_class_thresholds_are_mean_plus_k_std_of_each_class() -> None:
    losses = np.array([[[1.0, 3.0, 10.0, 10.0]], [[2.0, 2.0, 30.0, 50.0]]])
    masks = np.array([[[0, 0, 1, 1]], [[0, 0, 1, 1]]])
    stats = class_loss_stats(losses, masks, num_classes=3)
    assert stats.pixels.tolist() == [4, 4, 0]
    assert stats.mean[:2] == pytest.approx([2.0, 25.0])
    assert stats.std[:2] == pytest.approx([np.std([1, 3, 2, 2]), np.std([10, 10, 30, 50])])
    thresholds = stats.thresholds(k=1.0)
    assert thresholds[:2] == pytest.approx(stats.mean[:2] + stats.std[:2]) and np.isinf(thresholds[2])
    # a background pixel of loss 3 is far above background's usual loss; a class-1 pixel of 30 is not
    assert ignored_pixels(losses, masks, thresholds).tolist() == [[[False, True, False, False]],
                                                                  [[False, False, False, True]]]


def test_an_image_fraction_can_be_taken_over_the_foreground() -> None:
    mask = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])
    ignored = np.array([[False, False, False, True], [False, False, True, False]])
    assert ignored_fraction(ignored, mask, "all") == pytest.approx(2 / 8)
    assert ignored_fraction(ignored, mask, "foreground") == pytest.approx(2 / 3)
    assert ignored_fraction(ignored, np.zeros_like(mask), "foreground") == 0.0


def test_filtering_never_overwrites_an_earlier_filter(toy, tmp_path, capsys) -> None:
    data, scorers = toy
    samples = write_toy_samples(tmp_path / "sample_001", 2, 2)
    (samples / "labels_filtered").mkdir()
    assert filter_main(filter_args(data, scorers, samples)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "labels_filtered exist already" in err and "nothing is overwritten" in err
    assert not (samples / "filter.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# the scorer cache


def test_the_scorer_is_trained_once_and_keyed_by_the_dataset_files(tmp_path) -> None:
    data = write_toy_dataset(tmp_path / "data", num_train=6, num_test=2)
    settings = ScorerSettings.from_dict({"encoder": TINY_ENCODER, "steps": 2, "image_size": SIZE})
    quiet = {"log": lambda _: None, "progress": False}
    first = load_or_train_scorer(data, "multi-class", 3, settings, tmp_path / "cache", True, **quiet)
    again = load_or_train_scorer(data, "multi-class", 3, settings, tmp_path / "cache", False, **quiet)
    assert first.trained_now and not again.trained_now and again.folder == first.folder
    for name, value in first.model.state_dict().items():
        assert torch.equal(value.cpu(), again.model.state_dict()[name])
    assert json.loads((first.folder / "scorer.json").read_text())["train_images"] == 6
    # other settings, or an edited train file, need another scorer
    other = ScorerSettings.from_dict({"encoder": TINY_ENCODER, "steps": 3, "image_size": SIZE})
    with pytest.raises(CheckpointError, match="no scorer for dataset"):
        load_or_train_scorer(data, "multi-class", 3, other, tmp_path / "cache", False, **quiet)
    mask_file = sorted((data / "train" / "masks").iterdir())[0]
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(mask_file)
    with pytest.raises(CheckpointError, match=r"with these scorer settings .*--allow-training"):
        load_or_train_scorer(data, "multi-class", 3, settings, tmp_path / "cache", False, **quiet)


def test_a_missing_scorer_without_training_is_a_one_line_error(toy, tmp_path, capsys) -> None:
    data, _ = toy
    samples = write_toy_samples(tmp_path / "sample_001", 2, 2)
    assert filter_main(filter_args(data, tmp_path / "empty_cache", samples)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scorer cache") and err.count("\n") == 1
    assert "evaluation/filter.sh" in err and "--allow-training" in err and "--scorer-steps 60" in err
    assert not (samples / "labels_filtered").exists()


def test_the_training_command_reproduces_the_cache_key_settings() -> None:
    settings = ScorerSettings.from_dict({"encoder": "resnet34", "image_size": 64, "augment": False})
    command = training_command("data/tiles", settings, "cache")
    assert "--scorer-encoder resnet34" in command and "--scorer-augment false" in command
    assert "--scorer-image-size 64" in command and "--scorer-steps" not in command


# ---------------------------------------------------------------------------------------------------------------
# ignore_index in the losses and metrics


def test_ignored_pixels_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    masks = torch.randint(0, 3, (2, 8, 8))
    ignored = torch.rand(2, 8, 8) < 0.3
    labels = masks.masked_fill(ignored, IGNORE_INDEX)
    loss = segmentation_loss(3, IGNORE_INDEX)
    # whatever the logits say at ignored pixels, the loss is the same
    scrambled = torch.where(ignored[:, None], torch.randn_like(logits) * 10, logits)
    assert loss(logits, labels).item() == pytest.approx(loss(scrambled, labels).item(), rel=1e-6)
    # and it is the loss of the kept pixels alone, laid out as one row
    kept_logits = logits.permute(1, 0, 2, 3)[:, ~ignored].reshape(1, 3, 1, -1)
    kept_labels = masks[~ignored].reshape(1, 1, -1)
    assert loss(logits, labels).item() == pytest.approx(segmentation_loss(3)(kept_logits, kept_labels).item(),
                                                        rel=1e-5)


def test_ignored_pixels_do_not_change_the_metrics() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(3, 8, 8))
    pred = rng.integers(0, 3, size=(3, 8, 8))
    ignored = rng.random((3, 8, 8)) < 0.3
    labels = np.where(ignored, IGNORE_INDEX, target)
    other_pred = np.where(ignored, rng.integers(0, 3, size=(3, 8, 8)), pred)
    first = segmentation_metrics(pred, labels, 3, IGNORE_INDEX)
    second = segmentation_metrics(other_pred, labels, 3, IGNORE_INDEX)
    assert first.class_iou == pytest.approx(second.class_iou)
    assert first.class_image_iou == pytest.approx(second.class_image_iou)
    assert first.accuracy == pytest.approx(second.accuracy)


# ---------------------------------------------------------------------------------------------------------------
# the evaluation on filtered labels


def test_evaluation_trains_on_filtered_labels_without_the_dropped_images(toy, tmp_path, capsys) -> None:
    data, scorers = toy
    samples = write_toy_samples(tmp_path / "sample_001", 6, 6)
    common = ["--data-dir", str(data), "--samples", str(samples), "--mixes", "RALLF000", "RALLFALL", "--seeds", "0",
              "--models", "fpn", "--encoder", TINY_ENCODER, "--image-size", "32", "--steps", "2",
              "--batch-size", "4", "--root-log-dir", str(tmp_path / "runs")]
    assert evaluate_main(common + ["--synthetic-labels", "filtered"]) == 2
    assert "no labels_filtered/ and filter.json" in capsys.readouterr().err
    assert filter_main(filter_args(data, scorers, samples, extra=("--max-ignored-fraction", "0.3"))) == 0
    dropped = json.loads((samples / "filter.json").read_text())["dropped"]
    assert 0 < len(dropped) < 12
    folder = index_sample_folder(samples, 3, "filtered")
    assert folder.dropped == len(dropped) and len(folder.pairs) == 12 - len(dropped)
    assert {p.mask.parent.name for p in folder.pairs} == {"labels_filtered"}

    assert evaluate_main(common + ["--synthetic-labels", "filtered"]) == 0
    run = tmp_path / "runs" / "evaluate_001"
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["synthetic_labels"] == "filtered"
    assert resolved["mixes_resolved"]["RALLFALL"]["synthetic"] == 12 - len(dropped)
    assert "synthetic labels: filtered" in (run / "summary.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# hardness-aware selection


def test_hardness_sampling_draws_hard_masks_more_often_with_a_seed() -> None:
    hardness = np.array([1.0, 1.0, 1.0, 4.0])
    drawn = draw_by_hardness(hardness_weights(hardness, 1.0), 4000, seed=0)
    share = np.bincount(drawn, minlength=4) / 4000
    assert share[3] == pytest.approx(4 / 7, abs=0.03)
    assert np.array_equal(drawn, draw_by_hardness(hardness_weights(hardness, 1.0), 4000, seed=0))
    assert not np.array_equal(drawn, draw_by_hardness(hardness_weights(hardness, 1.0), 4000, seed=1))
    # a larger exponent draws the hard mask still more often; exponent 0 draws all alike
    assert np.mean(draw_by_hardness(hardness_weights(hardness, 2.0), 4000, 0) == 3) > share[3] + 0.1
    assert np.mean(draw_by_hardness(hardness_weights(hardness, 0.0), 4000, 0) == 3) == pytest.approx(0.25, abs=0.03)


def test_balancing_uses_the_harder_of_two_equally_useful_masks_more_often() -> None:
    counts = np.array([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])  # two masks per class, alike
    plain = np.bincount(greedy_selection(counts, np.zeros(2), 40, seed=0), minlength=4)
    weighted = np.bincount(greedy_selection(counts, np.zeros(2), 40, seed=0, weights=np.array([1, 3, 1, 1.0])),
                           minlength=4)
    assert plain.tolist() == [10, 10, 10, 10]
    assert weighted[1] >= 2.5 * weighted[0]
    assert weighted[:2].sum() == weighted[2:].sum() == 20  # the balance is untouched
    unweighted = greedy_selection(counts, np.zeros(2), 40, seed=0, weights=np.ones(4))
    assert np.array_equal(unweighted, greedy_selection(counts, np.zeros(2), 40, seed=0))


def test_mask_hardness_averages_over_the_classes_present() -> None:
    losses = np.array([[[0.1, 0.1, 0.1, 3.0]], [[0.1, 0.1, 0.1, 0.1]]])
    masks = np.array([[[0, 0, 0, 1]], [[0, 0, 0, 0]]])
    # a small hard defect counts as much as all the background around it
    assert mask_hardness(losses, masks, 2).tolist() == pytest.approx([(0.1 + 3.0) / 2, 0.1])


def test_sample_selection_with_hardness_args_writes_the_hardness_report(toy, tmp_path) -> None:
    data, scorers = toy
    values = {"data_dir": str(data), "num_classes": 3, "model_path": "m", "num_samples": 200, "mask_split": "all",
              "image_size": SIZE, "hardness_args": {"exponent": 2, "scorer_dir": str(scorers), "scorer": SCORER}}
    config, _ = config_from_dict("sample", values)
    splits, real = mask_splits(config, TrainedWith())
    chosen, report = select_masks(config, splits, real, log=lambda _: None, measure_hardness=measure_hardness)
    hardness = report["hardness"]
    assert len(chosen) == 200 and hardness["images"] == 200
    assert hardness["mean_hardness_chosen"] > hardness["mean_hardness_candidates"]
    write_selection_reports(tmp_path, report)
    assert json.loads((tmp_path / "hardness.json").read_text())["candidates"] == len(splits["all"])
    assert Image.open(tmp_path / "hardness.png").size[0] > 300 and not (tmp_path / "balance.json").exists()

    balanced, _ = config_from_dict("sample", {**values, "balance_args": {}})
    _, both = select_masks(balanced, splits, real, log=lambda _: None, measure_hardness=measure_hardness)
    assert both["hardness"]["selection"].startswith("greedy class balancing") and "shares" in both


def test_hardness_args_are_checked_strictly(toy) -> None:
    data, _ = toy
    base = {"data_dir": str(data), "num_classes": 3, "model_path": "m"}
    for hardness_args, message in (({"exponnt": 1}, r"'hardness_args.exponnt' is unknown \(did you mean 'exponent'"),
                                   ({"exponent": -1}, "'hardness_args.exponent' must be a number >= 0"),
                                   ({"allow_training": "yes"}, "'hardness_args.allow_training' must be true/false")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict("sample", {**base, "hardness_args": hardness_args})
    config, _ = config_from_dict("sample", {**base, "hardness_args": {}})
    assert config.hardness_args.exponent == 1.0 and config.hardness_args.allow_training is False
    assert ScorerSettings.of_sample_config(config) == ScorerSettings()  # `{}`: the defaults


@pytest.mark.parametrize("scorer, message", [
    ({"image_size": 40}, "key 'hardness_args.scorer.image_size' must be a multiple of 32"),
    ({"steps": "10"}, "key 'hardness_args.scorer.steps' must be an integer, got \"10\""),
    ({"stpes": 10}, "key 'hardness_args.scorer.stpes' is unknown (did you mean 'steps'?)"),
    ({"architecture": "segformer"}, "key 'hardness_args.scorer.architecture': unknown segmenter 'segformer'"),
])
def test_the_scorer_keys_of_hardness_args_are_read_strictly_by_evaluation(scorer, message) -> None:
    # guided_diffusion keeps the object as given (its engine knows no segmenter); evaluation reads it, with the
    # one-line error of any other key, naming the config file
    config, _ = config_from_dict("sample", {"data_dir": "d", "num_classes": 3, "model_path": "m",
                                            "hardness_args": {"scorer": scorer}})
    with pytest.raises(ConfigError) as caught:
        ScorerSettings.of_sample_config(config, "configs/x.json")
    assert str(caught.value).startswith(f"configs/x.json: {message}") and "\n" not in str(caught.value)


def test_a_bad_scorer_key_stops_main_py_sample_before_any_work(toy, tmp_path, capsys) -> None:
    import main

    data, _ = toy
    path = tmp_path / "sample.json"
    path.write_text(json.dumps({"data_dir": str(data), "num_classes": 3, "model_path": str(tmp_path / "none"),
                                "root_log_dir": str(tmp_path / "runs"),
                                "hardness_args": {"scorer": {"steps": 0}}}))
    for dry_run in ([], ["--dry-run"]):
        assert main.main(["sample", "-c", str(path), *dry_run]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == f"error: {path}: key 'hardness_args.scorer.steps' must be at least 1, got 0"
        assert captured.out == "" and not (tmp_path / "runs").exists()


def test_the_scorer_settings_keep_their_cache_key() -> None:
    # the key of a scorer cached before the settings moved out of guided_diffusion/config.py (issue 35)
    defaults = ScorerSettings().at_size(64)
    assert scorer_key("0" * 64, defaults, "multi-class", 3) == \
        "ecc0f8b0d413cd4dccdb85e34ddee1f4ddb467ae3806224e1f5e39dcc8f98320"


def test_hardness_without_a_cached_scorer_says_how_to_train_it(toy, tmp_path) -> None:
    data, _ = toy
    values = {"data_dir": str(data), "num_classes": 3, "model_path": "m", "image_size": SIZE, "mask_split": "all",
              "hardness_args": {"scorer_dir": str(tmp_path / "none")}}
    config, _ = config_from_dict("sample", values)
    splits, real = mask_splits(config, TrainedWith())
    with pytest.raises(CheckpointError, match=r"no scorer for dataset .*or set hardness_args.allow_training"):
        select_masks(config, splits, real, log=lambda _: None, measure_hardness=measure_hardness)


def test_hardness_is_measured_by_the_function_the_caller_hands_in(toy) -> None:
    data, _ = toy
    values = {"data_dir": str(data), "num_classes": 3, "model_path": "m", "image_size": SIZE, "mask_split": "all",
              "num_samples": 50, "hardness_args": {"exponent": 1}}
    config, _ = config_from_dict("sample", values)
    splits, real = mask_splits(config, TrainedWith())
    with pytest.raises(ValueError, match="pass evaluation.freemask.measure_hardness"):
        select_masks(config, splits, real, log=lambda _: None)
    hard = {pair.stem: 1.0 + 9.0 * (i == 0) for i, pair in enumerate(splits["all"])}
    chosen, report = select_masks(config, splits, real, log=lambda _: None,
                                  measure_hardness=lambda c, pairs, log: (np.array([hard[p.stem] for p in pairs]), {}))
    assert report["hardness"]["masks"][0]["stem"] == splits["all"][0].stem and len(chosen) == 50


def test_filter_settings_are_read_by_the_config_routine() -> None:
    with pytest.raises(ConfigError, match=r"key 'generators.f.filter.k' must be a number, got \"1\""):
        FilterSettings.from_dict({"k": "1"}, "generators.f.filter")
    with pytest.raises(ConfigError, match=r"key 'generators.f.filter.max_ignored_fraction' must be in \[0, 1\]"):
        FilterSettings.from_dict({"max_ignored_fraction": 2}, "generators.f.filter")
    assert FilterSettings.from_dict({"k": 2}) == FilterSettings(k=2.0)


def test_filter_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'max_ignored_fraction' must be in \[0, 1\]"):
        FilterSettings(max_ignored_fraction=1.5)
    with pytest.raises(ConfigError, match="'drop_basis' must be one of foreground, all"):
        FilterSettings(drop_basis="defects")

"""Class-balanced mask selection (`balance_args`): the greedy, mask augmentation, magnetic-tile shares, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from conftest import MAGNETIC_TILE, MAGNETIC_TILE_BINARY, TINY_MODEL, write_config
from guided_diffusion.balance import (DIHEDRAL, Augmentation, BalanceArgs, balance, choose_masks, components,
                                      count_all, count_classes, dihedral, greedy_selection, load_masks,
                                      make_augmented, paste_components, relative_difference, shares, warp)
from guided_diffusion.config import config_from_dict
from guided_diffusion.data import SegmentationDataset, index_dataset, split_train_val
from guided_diffusion.errors import ConfigError
from guided_diffusion.sampling.sample import (TrainedWith, mask_splits, preview_mask_selection, run_sampling,
                                              select_masks)

needs_real_data = pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/datasets is not present")


def mask_with(size: int = 32, *squares: tuple[int, int, int, int]) -> np.ndarray:
    """A uint8 mask with (class, top, left, side) squares drawn on class 0."""
    mask = np.zeros((size, size), np.uint8)
    for class_id, top, left, side in squares:
        mask[top:top + side, left:left + side] = class_id
    return mask


def single_class_masks() -> list[np.ndarray]:
    """Masks of one class each, of different sizes: class 1 big, class 2 medium, class 3 small; two empty."""
    masks = [mask_with(32, (1, 2, 2, 8 + i)) for i in range(3)]
    masks += [mask_with(32, (2, 4, 4 + i, 5)) for i in range(3)]
    masks += [mask_with(32, (3, 10 + i, 10, 3)) for i in range(3)]
    return masks + [mask_with(32), mask_with(32)]


def counts_of(masks: list[np.ndarray], by_pixels: bool = True, classes: tuple[int, ...] = (1, 2, 3)) -> np.ndarray:
    return count_all(masks, 4, by_pixels)[:, list(classes)].sum(0)


# ---------------------------------------------------------------------------------------------------------------
# What is counted, and what "relative difference" means


def test_relative_difference_is_max_minus_min_over_min():
    assert relative_difference(np.array([100, 110, 105])) == pytest.approx(0.1)
    assert relative_difference(np.array([3, 3])) == 0.0
    assert relative_difference(np.array([0, 5])) == float("inf")
    assert relative_difference(np.array([7])) == 0.0  # one class is always balanced


def test_objects_are_8_connected_components_per_class():
    mask = mask_with(16, (1, 0, 0, 2), (1, 2, 2, 2), (1, 10, 10, 2), (2, 5, 12, 3))
    assert count_classes(mask, 3, by_pixels=False).tolist() == [1, 2, 1]  # diagonal squares touch: one object
    assert count_classes(mask, 3, by_pixels=True).tolist() == [256 - 12 - 9, 12, 9]


@needs_real_data
def test_masks_are_counted_as_sampling_sees_them():
    pairs = index_dataset(MAGNETIC_TILE, "multi-class", 6).train[:20]
    for mode in ("resize", "crop"):
        dataset = SegmentationDataset(pairs, 32, "multi-class", mode)
        for i, mask in enumerate(load_masks(pairs, 32, "multi-class", mode)):
            assert np.array_equal(mask, dataset[i]["mask"].numpy())


# ---------------------------------------------------------------------------------------------------------------
# The greedy selection


def test_selection_has_exactly_num_samples_and_is_the_same_for_a_seed():
    masks, args = single_class_masks(), BalanceArgs(based_on_generated_data_only=True)
    first = balance(masks, np.zeros(4), 37, 4, args, seed=3)
    again = balance(masks, np.zeros(4), 37, 4, args, seed=3)
    other = balance(masks, np.zeros(4), 37, 4, args, seed=4)
    assert len(first.choices) == 37 and first.choices == again.choices
    assert first.choices != other.choices


def test_real_plus_synthetic_shares_reach_the_tolerance():
    masks = single_class_masks()
    real = np.array([0, 300, 100, 20])  # class 3 is rare in the real set
    result = balance(masks, real, 60, 4, BalanceArgs(max_class_dif=0.1), seed=0)
    total = real[1:] + counts_of(result.masks)
    assert result.warning is None
    assert relative_difference(total) <= 0.1 < relative_difference(real[1:] + result.unbalanced)


def test_generated_only_balances_the_synthetic_set_alone():
    masks = single_class_masks()
    real = np.array([0, 900, 100, 20])
    result = balance(masks, real, 40, 4, BalanceArgs(based_on_generated_data_only=True), seed=0)
    assert relative_difference(counts_of(result.masks)) <= 0.1
    assert relative_difference(real[1:] + counts_of(result.masks)) > 1  # the real imbalance was not the target


def test_ejected_classes_take_no_part():
    masks = single_class_masks()
    args = BalanceArgs(ejection_classes=(0, 1), based_on_generated_data_only=True)
    result = balance(masks, np.zeros(4), 30, 4, args, seed=0)
    assert result.participating == [2, 3]
    assert all(count_classes(m, 4, True)[1] == 0 for m in result.masks)  # class-1 masks cannot help: never chosen
    assert relative_difference(counts_of(result.masks, classes=(2, 3))) <= 0.1


def test_background_takes_part_when_it_is_not_ejected():
    masks = [mask_with(8, (1, 0, 0, 8)), mask_with(8)]
    args = BalanceArgs(ejection_classes=(), based_on_generated_data_only=True, max_class_dif=0.0)
    result = balance(masks, np.zeros(2), 4, 2, args, seed=0)
    assert result.participating == [0, 1]
    assert count_all(result.masks, 2, True).sum(0).tolist() == [128, 128]  # all-background masks now count


def test_masks_without_a_participating_class_are_never_chosen():
    result = balance(single_class_masks(), np.zeros(4), 50, 4, BalanceArgs(based_on_generated_data_only=True), 0)
    assert all(m.any() for m in result.masks)


def test_one_participating_class_is_a_no_op_said_in_a_note():
    masks = [mask_with(8, (1, 0, 0, 2)), mask_with(8), mask_with(8, (1, 4, 4, 3))]
    result = balance(masks, np.array([50, 5]), 5, 2, BalanceArgs(), seed=0)
    assert result.no_op and result.warning is None and "no-op" in result.notes[0]
    assert [c.source for c in result.choices] == [0, 1, 2, 0, 1]  # dataset order, cycled


def test_a_class_in_no_mask_ends_with_one_warning_naming_it():
    masks = [m for m in single_class_masks() if not (m == 3).any()]
    result = balance(masks, np.zeros(4), 20, 4, BalanceArgs(based_on_generated_data_only=True), 0, "bg a b c".split())
    assert len(result.choices) == 20
    assert "c in no candidate mask" in result.warning and "relative difference infinite" in result.warning
    assert "\n" not in result.warning and "synthetic shares a " in result.warning and "c 0.0%" in result.warning


def test_too_few_samples_for_the_tolerance_warn_with_the_achieved_shares():
    masks = single_class_masks()
    result = balance(masks, np.zeros(4), 2, 4, BalanceArgs(based_on_generated_data_only=True), seed=0)
    assert len(result.choices) == 2 and result.achieved == float("inf")
    assert "not reached with 2 masks" in result.warning and "shares" in result.warning


def test_reuse_is_penalised_so_equal_masks_take_turns():
    counts = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)  # every mask holds one object
    picked = greedy_selection(counts, np.zeros(2), 16, seed=0)
    assert np.bincount(picked, minlength=8).tolist() == [2] * 8


# ---------------------------------------------------------------------------------------------------------------
# Mask augmentation


def test_flips_turns_and_warps_keep_class_ids_and_size():
    mask = mask_with(32, (1, 2, 2, 6), (2, 20, 5, 4), (3, 10, 18, 9))
    rng = np.random.default_rng(0)
    for made in [dihedral(mask, kind) for kind in DIHEDRAL] + [warp(mask, rng) for _ in range(5)]:
        assert made.shape == mask.shape and made.dtype == mask.dtype
        assert set(np.unique(made)) <= set(np.unique(mask))
    assert np.array_equal(dihedral(dihedral(mask, "rot90"), "rot270"), mask)
    assert count_classes(dihedral(mask, "transpose"), 4, True).tolist() == count_classes(mask, 4, True).tolist()


def test_pasting_covers_only_background_and_adds_separate_objects():
    host = mask_with(32, (1, 0, 0, 12), (3, 20, 20, 8))
    pieces = components(mask_with(16, (2, 2, 2, 3), (2, 9, 9, 2)), 2)
    assert [p.sum() for p in pieces] == [9, 4]
    for seed in range(10):
        made, landed = paste_components(host, pieces, 2, 4, np.random.default_rng(seed))
        assert np.array_equal(made[host != 0], host[host != 0])  # no class overwritten
        assert set(np.unique(made)) <= {0, 1, 2, 3}
        assert landed >= 1 and count_classes(made, 4, False)[2] == landed  # each piece a separate object
        grown = (made == 2) & (host == 0)
        near_other = np.zeros_like(grown)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near_other |= np.roll(np.roll(np.isin(host, (1, 3)), dy, 0), dx, 1)
        assert not (grown & near_other).any()  # a 1-pixel ring of background around every pasted piece


def test_pasting_skips_pieces_that_do_not_fit():
    full = mask_with(8, (1, 0, 0, 8))
    made, landed = paste_components(full, [np.ones((2, 2), bool)], 2, 3, np.random.default_rng(0))
    assert landed == 0 and np.array_equal(made, full)


def test_a_piece_finds_the_only_place_it_fits():
    host = np.ones((32, 32), np.uint8)
    host[20:27, 3:10] = 0  # one 7x7 hole: a 5x5 piece with its 1-pixel ring fits in exactly one place
    made, landed = paste_components(host, [np.ones((5, 5), bool)], 2, 1, np.random.default_rng(0))
    assert landed == 1 and (made[21:26, 4:9] == 2).all() and (made == 2).sum() == 25


def co_occurring_masks() -> list[np.ndarray]:
    """Class 2 only ever appears beside a 25x bigger class-1 square; four masks are empty."""
    masks = [mask_with(32, (1, 2 + i, 2, 10), (2, 20, 20 + i, 2)) for i in range(6)]
    return masks + [mask_with(32) for _ in range(4)]


def test_augmentation_balances_a_class_that_always_comes_with_a_frequent_one():
    masks = co_occurring_masks()
    plain = BalanceArgs(based_on_generated_data_only=True, max_class_dif=0.2)
    without = balance(masks, np.zeros(3), 40, 3, plain, seed=0)
    augmented = balance(masks, np.zeros(3), 40, 3, dataclass_replace(plain, use_mask_augmentation=True), seed=0)
    assert "use_mask_augmentation may help" in without.warning
    assert relative_difference(count_all(without.masks, 3, True)[:, 1:].sum(0)) > 5
    assert augmented.warning is None and augmented.augmented > 0
    assert relative_difference(count_all(augmented.masks, 3, True)[:, 1:].sum(0)) <= 0.2


def dataclass_replace(args: BalanceArgs, **changes) -> BalanceArgs:
    from dataclasses import replace
    return replace(args, **changes)


def test_augmented_masks_are_valid_masks_of_the_dataset_and_made_the_same_for_a_seed():
    masks = co_occurring_masks()
    args = BalanceArgs(based_on_generated_data_only=True, use_mask_augmentation=True)
    first = balance(masks, np.zeros(3), 40, 3, args, seed=5)
    again = balance(masks, np.zeros(3), 40, 3, args, seed=5)
    assert first.choices == again.choices
    assert all(np.array_equal(a, b) for a, b in zip(first.masks, again.masks))
    for choice, made in zip(first.choices, first.masks):
        source = masks[choice.source]
        assert made.shape == source.shape and set(np.unique(made)) <= {0, 1, 2}
        if choice.augmentation is not None and choice.augmentation.kind == "paste":
            assert np.array_equal(made[source != 0], source[source != 0])


def test_an_augmentation_recipe_makes_the_same_mask_every_time():
    masks = co_occurring_masks()
    pieces = {2: components(masks[0], 2)}
    for kind in ("warp", "paste", "rot90"):
        recipe = Augmentation(kind, 0 if kind != "paste" else 7, 2, seed=11)
        assert np.array_equal(make_augmented(recipe, masks, pieces), make_augmented(recipe, masks, pieces))


# ---------------------------------------------------------------------------------------------------------------
# magnetic-tile (train: blowhole 86, break 64, crack 43, fray 24, uneven 77 images): 500 masks from the val split


@pytest.fixture(scope="module")
def magnetic_tile():
    """The val-split candidate masks and the real train/ masks at 32 px, loaded once."""
    index = index_dataset(MAGNETIC_TILE, "multi-class", 6)
    _, val = split_train_val(index.train, 0.2, 0)
    masks = dict(zip(index.train, load_masks(index.train, 32, "multi-class", "resize")))
    return [masks[p] for p in val], [masks[p] for p in index.train]


def balance_magnetic_tile(magnetic_tile, **args):
    candidates, real_masks = magnetic_tile
    balance_args = BalanceArgs(**args)
    real = count_all(real_masks, 6, balance_args.based_on_pixel_count).sum(0)
    return balance(candidates, real, 500, 6, balance_args, seed=0), real[1:]


@needs_real_data
def test_magnetic_tile_by_object_count_reaches_the_tolerance(magnetic_tile):
    result, real = balance_magnetic_tile(magnetic_tile, based_on_pixel_count=False)
    unbalanced = relative_difference(real + result.unbalanced)
    assert result.warning is None
    assert result.achieved == relative_difference(real + counts_of_objects(result.masks)) <= 0.1 < unbalanced
    assert len({c.source for c in result.choices}) > 40  # varied: most of the val masks with defects are used


def counts_of_objects(masks: list[np.ndarray]) -> np.ndarray:
    return count_all(masks, 6, False)[:, 1:].sum(0)


@needs_real_data
def test_magnetic_tile_by_pixel_count_ends_at_the_best_it_can_with_a_warning(magnetic_tile):
    candidates, _ = magnetic_tile
    result, real = balance_magnetic_tile(magnetic_tile, based_on_pixel_count=True)
    per_mask = count_all(candidates, 6, True)[:, 1:]
    # Provably impossible: even 500 copies of the mask richest in blowhole pixels cannot reach the largest class.
    most_possible = real + 500 * per_mask.max(0)
    assert (most_possible * 1.1 < real.max()).any()
    assert "not reached with 500 masks" in result.warning
    total = real + count_all(result.masks, 6, True)[:, 1:].sum(0)
    assert result.achieved == relative_difference(total) < relative_difference(real + result.unbalanced) / 5
    rarest = int(np.argmin(real))
    assert shares(total)[rarest] > 5 * shares(real + result.unbalanced)[rarest]


@needs_real_data
def test_magnetic_tile_augmentation_improves_the_pixel_balance_with_valid_masks(magnetic_tile):
    plain, _ = balance_magnetic_tile(magnetic_tile, based_on_pixel_count=True)
    augmented, _ = balance_magnetic_tile(magnetic_tile, based_on_pixel_count=True, use_mask_augmentation=True)
    assert augmented.augmented > 0 and augmented.achieved < plain.achieved
    for mask in augmented.masks:
        assert mask.shape == (32, 32) and mask.max() <= 5


@needs_real_data
def test_binary_dataset_balancing_is_a_no_op_said_in_the_log(tmp_path):
    values = {"data_dir": str(MAGNETIC_TILE_BINARY), "dataset_mode": "binary", "num_classes": 2, "model_path": "m",
              "num_samples": 7, "balance_args": {}, **TINY_MODEL}
    config, _ = config_from_dict("sample", values)
    splits, real = mask_splits(config, TrainedWith())
    lines: list[str] = []
    chosen, report = select_masks(config, splits, real, lines.append)
    assert [c.pair for c in chosen] == splits["val"][:7]
    assert report["no_op"] and any("no-op" in line for line in lines)


# ---------------------------------------------------------------------------------------------------------------
# Sampling with balance_args: the sampler gets exactly the chosen masks


def sample_values(demo_dir: Path, model_path: Path, root: Path, **changes) -> dict:
    return {"data_dir": str(demo_dir), "model_path": str(model_path), "root_log_dir": str(root), "num_samples": 6,
            "batch_size": 3, "timestep_respacing": "5", "mask_split": "all",
            "balance_args": {"max_class_dif": 0.0, "use_mask_augmentation": True}, **changes}


def test_sampling_uses_exactly_the_chosen_masks(demo_dir, trained_run, tmp_path):
    values = sample_values(demo_dir, trained_run, tmp_path)
    config, _ = config_from_dict("sample", values)
    run_dir = Path(run_sampling(config, given=set(values), log=lambda *_: None)["run_dir"])
    report = json.loads((run_dir / "balance.json").read_text())
    stems = [f"{i:05d}_{m['stem']}" for i, m in enumerate(report["masks"])]
    assert sorted(p.stem for p in (run_dir / "samples").glob("*.png")) == stems
    assert sorted(p.stem for p in (run_dir / "labels").glob("*.png")) == stems
    augmented = [s for s, m in zip(stems, report["masks"]) if m["augmentation"]]
    assert augmented and all("_aug" in s for s in augmented)
    assert sorted(p.stem for p in (run_dir / "images").glob("*.png")) == [s for s in stems if s not in augmented]
    assert (run_dir / "balance.png").is_file()
    index = index_dataset(demo_dir, "multi-class", 4)
    by_stem = {p.stem: p for p in index.train + index.test}
    for stem, entry in zip(stems, report["masks"]):
        label = np.asarray(Image.open(run_dir / "labels" / f"{stem}.png"))
        if entry["augmentation"] is None:  # a real mask, as sampling loads it
            expected = SegmentationDataset([by_stem[entry["stem"]]], 32, "multi-class")[0]["mask"].numpy()
            assert np.array_equal(label, expected)
    chosen_counts = count_all([np.asarray(Image.open(run_dir / "labels" / f"{s}.png")) for s in stems], 4, True)
    assert chosen_counts[:, 1:].sum(0).tolist() == report["counts"]["selected"]


def test_dry_run_writes_the_report_without_sampling(demo_dir, trained_run, tmp_path, capsys):
    root = tmp_path / "R"
    config = write_config(tmp_path / "sample.json", sample_values(demo_dir, trained_run, root))
    assert main.main(["sample", "-c", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "class shares by pixels" in out and "relative difference" in out
    run_dir = root / "sample_001"
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "balance.json", "balance.png"}
    assert json.loads((run_dir / "config.json").read_text())["dry_run"] is True


def test_ejection_class_beyond_the_checkpoints_classes_is_a_config_error(demo_dir, trained_run, tmp_path):
    values = sample_values(demo_dir, trained_run, tmp_path / "R", balance_args={"ejection_classes": [0, 7]})
    config, _ = config_from_dict("sample", values)  # num_classes comes from the checkpoint: checked there
    with pytest.raises(ConfigError, match=r"key 'balance_args.ejection_classes' holds class id 7, outside 0..3"):
        preview_mask_selection(config, set(values), "sample.json", log=lambda *_: None)
    assert not (tmp_path / "R").exists()


def test_choose_masks_names_augmented_masks_after_their_source(demo_dir):
    values = {"data_dir": str(demo_dir), "num_classes": 4, "model_path": "m", "num_samples": 8,
              "balance_args": {"max_class_dif": 0.0, "use_mask_augmentation": True}, **TINY_MODEL}
    config, _ = config_from_dict("sample", values)
    splits, real = mask_splits(config, TrainedWith())
    chosen, report = choose_masks(config, splits["all"], real, log=lambda *_: None)
    for item, entry in zip(chosen, report["masks"]):
        assert item.stem == entry["stem"]
        if item.pair is None:
            assert item.stem.startswith("aug") and item.stem.endswith(f"-{entry['augmentation']}_{entry['source']}")
            assert item.mask.shape == (32, 32)

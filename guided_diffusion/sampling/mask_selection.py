"""Which masks a sample run draws, in every mode (sample.py's model modes and paste.py's copy-paste).

The candidates are the pairs of the dataset split named by `mask_split` ("val" = the masks held out from
training, recreated with the training run's seed and val_fraction). Without `balance_args` they are taken in
dataset order and cycled until `num_samples`; with it balance.py chooses (and augments) them so the classes end
up balanced; with `hardness_args` hard masks are drawn more often (hardness.py), measured by the function the
caller hands in (`measure_hardness`, evaluation.freemask's; this package never imports evaluation).

A module of its own so that sample.py and paste.py both use it and neither imports the other's caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..balance import ChosenMask, choose_masks
from ..config import SampleConfig
from ..data import Pair, index_dataset, split_train_val
from ..errors import ConfigError
from .hardness import MeasureHardness, draw_by_hardness, uses_of, weigh_by_hardness


@dataclass(frozen=True)
class TrainedWith:
    """What sampling needs to know about the training run behind a checkpoint."""

    diffusion_steps: int = 1000
    seed: int = 0
    val_fraction: float = 0.2


def mask_splits(config: SampleConfig, trained: TrainedWith) -> tuple[dict[str, list[Pair]], list[Pair]]:
    """The pairs of each `mask_split` value (val recreated as in training; "all" = train/ and test/ when the
    dataset has a test/ folder), and the real set: train/'s pairs."""
    index = index_dataset(config.data_dir, config.dataset_mode, config.num_classes,
                          require_test=config.mask_split == "test", ignore_value=config.ignore_index)
    train_pairs, val_pairs = split_train_val(index.train, trained.val_fraction, trained.seed)
    return {"train": train_pairs, "val": val_pairs, "test": index.test, "all": index.train + index.test}, index.train


def select_masks(config: SampleConfig, pairs_by_split: dict[str, list[Pair]], real_pairs: list[Pair] = (),
                 log=print, measure_hardness: MeasureHardness | None = None
                 ) -> tuple[list[ChosenMask], dict[str, Any] | None]:
    """The mask of each of the num_samples images, and with balance_args the report of the class shares.

    Without balance_args: the split's pairs in order, cycled (no report). With it: balance.choose_masks over the
    split's pairs, `real_pairs` being the real set the shares start from. With hardness_args the masks are
    drawn in proportion to hardness^exponent, or, with balance_args too, favoured by it within the balancing
    (hardness.py; `measure_hardness` is required then); the report then holds the hardness report under
    "hardness"."""
    pairs = pairs_by_split[config.mask_split]
    if not pairs:
        raise ConfigError(f"key 'mask_split' is {config.mask_split!r} but that split has no masks "
                          f"(the model was trained with val_fraction 0); choose 'train', 'test' or 'all'")
    hardness = None if config.hardness_args is None else weigh_by_hardness(config, pairs, measure_hardness, log)
    if config.balance_args is None:
        if hardness is not None:
            drawn = [pairs[i] for i in draw_by_hardness(hardness.weights, config.num_samples, config.seed)]
            report = hardness.report(uses_of(pairs, drawn)[0])
            return [ChosenMask(pair.stem, pair) for pair in drawn], {"hardness": report}
        cycled = [pairs[i % len(pairs)] for i in range(config.num_samples)]
        return [ChosenMask(pair.stem, pair) for pair in cycled], None
    chosen, report = choose_masks(config, pairs, list(real_pairs), log,
                                  None if hardness is None else hardness.weights)
    if hardness is not None:
        uses, augmented = uses_of(pairs, [c.pair for c in chosen])
        report["hardness"] = hardness.report(uses, augmented, with_balance=True)
    return chosen, report

"""The evaluation's typed config: JSON file keys, command-line options and `--set key=value`, checked strictly.

Precedence: defaults < JSON config < command-line options < `--set`. A key that is unknown, of the wrong type or
out of range raises a one-line `ConfigError` naming the source and the key. The keys are read by the one routine
of guided_diffusion/config_io.py (as the actions' configs are), then checked by `EvaluateConfig.validate()`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from guided_diffusion.config_io import did_you_mean, expected, read, to_json_dict
from guided_diffusion.config import option
from guided_diffusion.data import RESIZE_MODES, canonical_dataset_mode
from guided_diffusion.errors import ConfigError

from ..image_sets import check_label_keys
from ..segmenter.pretrained import encoder_weights_problem
from ..segmenter.settings import canonical_architecture
from .mixes import parse_mixes

SYNTHETIC_LABELS = ("raw", "filtered")
"""Which labels of the sample folders train the segmenters: labels/ as sampled, or labels_filtered/ (255 =
ignored pixels) less the images the filter dropped."""


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluation/evaluate.sh`: its own keys (a JSON config, command-line options, `--set key=value`), not those
    of `main.py`.

    Every setting of an evaluation run, with its default and meaning (`option`); `expect` words what a key takes."""

    data_dir: str = option("", "dataset with `train/` and `test/` (`images/`, `masks/`); required",
                           expect="a folder path")
    sample_dirs: list[str] = option(doc="sample run folders, or folders of `sample_NNN` runs (option `--samples`)",
                                    factory=list, expect="a list of sample run folders")
    mixes: list[str] = option(doc="mix names, `R<real>F<synthetic>` (docs/evaluation.md)",
                              factory=lambda: ["RALLF000", "RALLFALL"],
                              expect="a list of mix names such as [\"RALLF000\", \"RALLF100\"]")
    seeds: list[int] = option(doc="one training run per seed; tables show mean ± std (n − 1)",
                              factory=lambda: [0, 1, 2], expect="a list of integers")
    models: list[str] = option(doc="segmenters: `unetplusplus` (`unet++`), `fpn`, `deeplabv3plus` (`deeplabv3+`), "
                                   "`unet`", factory=lambda: ["unetplusplus", "fpn", "deeplabv3plus"],
                               expect="a list of segmenter names")
    encoder: str = option("resnet18", "any smp encoder (`resnet18`, `resnet50`, `tu-<timm name>`, ...)",
                          expect="an encoder name such as \"resnet18\"")
    encoder_weights: str | None = option(None, "`null` = random init; `\"imagenet\"` = ImageNet weights (from an "
                                               "installed package that ships them, else smp's download: "
                                               "docs/evaluation.md); or a local encoder state dict "
                                               "(torchvision/timm names)",
                                         expect="\"imagenet\", a weights file path or null")
    dataset_mode: str = option("multi-class", "as for training: `multi-class` or `binary`",
                               expect="\"multi-class\" or \"binary\"")
    num_classes: int | None = option(None, "as for training; `null` = binary → 2, else `classes.json`, else the "
                                           "sample folder's `config.json`", expect="an integer or null")
    image_size: int = option(256, "side all images are resized to (multiple of 32); test masks are scored at this "
                                  "size")
    resize_mode: str = option("resize", "`resize` (stretch) or `crop` (short side + centre crop)",
                              expect=" or ".join(f'"{m}"' for m in RESIZE_MODES))
    batch_size: int = option(8, "images per step; >= 2 (AdamW with cosine decay, Dice + cross-entropy loss)")
    steps: int = option(2000, "optimizer steps per training run (the same for every mix)")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay); > 0")
    weight_decay: float = option(1e-4, "AdamW weight decay; >= 0")
    augment: bool = option(True, "random horizontal and vertical flips", expect="true or false")
    device: str = option("auto", "`auto`, `cpu`, `cuda`, `cuda:N`", expect="\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")
    root_log_dir: str = option("Results", "where `evaluate_NNN/` is made", expect="a folder path")
    label_alignment: bool = option(True, "score the sample folders with the `RALLF000` segmenters (added to the "
                                         "mixes when missing)", expect="true or false")
    inception_weights: str | None = option(None, "local Inception-v3 weights file: adds FID/KID",
                                           expect="a weights file path or null")
    synthetic_labels: str = option("raw", "`raw` (`labels/`) or `filtered` (`labels_filtered/` of "
                                          "evaluation/filter.sh, see docs/filtering.md)",
                                   expect="\"raw\" (labels/) or \"filtered\" (labels_filtered/ of "
                                          "evaluation/filter.sh)")
    background_class: int | None = option(0, "class left out of the \"w/o bg\" means; `null` (option value `none`) "
                                             "when no class is background (scene datasets whose class 0 is sky or "
                                             "road)", expect="the class id left out of 'without background' means, "
                                                             "or null for none")
    ignore_index: int | None = option(None, "label value that training and metrics skip, e.g. 255 = void; real "
                                            "masks may hold it; with filtered labels `null` means 255",
                                      expect="a label value that losses and metrics skip (e.g. 255), or null")

    def validate(self) -> None:
        """Range and content checks that need more than a type (raises ConfigError naming the key)."""
        if not self.data_dir:
            raise ConfigError("key 'data_dir' is required: the dataset folder with train/ and test/")
        for key in ("sample_dirs", "mixes", "models"):
            values = getattr(self, key)
            if not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"key '{key}' must be {expected(EvaluateConfig, key)}, got {json.dumps(values)}")
        for key in ("mixes", "seeds", "models"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' must not be empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"key 'seeds' lists a seed twice: {self.seeds}")
        parse_mixes(self.mixes)
        architectures = [canonical_architecture(name) for name in self.models]
        if len(set(architectures)) != len(architectures):
            raise ConfigError(f"key 'models' lists a segmenter twice: {self.models}")
        canonical_dataset_mode(self.dataset_mode)
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"key 'num_classes' must be at least 2 (background + 1 class), got {self.num_classes}")
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"key 'image_size' must be a multiple of 32 (the encoders downsample 32 times), "
                              f"got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"key 'resize_mode' must be {expected(EvaluateConfig, 'resize_mode')}, got "
                              f"{self.resize_mode!r}")
        if self.batch_size < 2:
            raise ConfigError(f"key 'batch_size' must be at least 2 (batch norm needs two images), got "
                              f"{self.batch_size}")
        if self.steps < 1:
            raise ConfigError(f"key 'steps' must be at least 1, got {self.steps}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"keys 'lr' and 'weight_decay' must be > 0 and >= 0, got {self.lr} and "
                              f"{self.weight_decay}")
        if self.synthetic_labels not in SYNTHETIC_LABELS:
            raise ConfigError(f"key 'synthetic_labels' must be {expected(EvaluateConfig, 'synthetic_labels')}, got "
                              f"{self.synthetic_labels!r}")
        if self.background_class is not None and self.background_class < 0:
            raise ConfigError(f"key 'background_class' must be a class id >= 0 or null, got {self.background_class}")
        if self.num_classes is not None:
            check_label_keys(self.background_class, self.ignore_index, self.num_classes)
        if self.ignore_index is not None:
            if not 0 <= self.ignore_index <= 255:
                raise ConfigError(f"key 'ignore_index' must be a label value in 0..255 or null, got "
                                  f"{self.ignore_index}")
            if self.synthetic_labels == "filtered" and self.ignore_index != 255:
                raise ConfigError(f"key 'ignore_index' is {self.ignore_index} but filtered labels mark ignored "
                                  "pixels with 255; use 255 or leave it null")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"key 'device' must be {expected(EvaluateConfig, 'device')}, got {self.device!r}")
        problem = encoder_weights_problem(self.encoder_weights)
        if problem:
            raise ConfigError(f"key 'encoder_weights' {problem}")


_KEYS = [f.name for f in dataclasses.fields(EvaluateConfig)]


def config_from_dict(values: dict[str, Any], source: str = "config") -> EvaluateConfig:
    """Build and check a config from flat key: value pairs (keys starting with '_' or '#' are comments; one sample
    folder may be given as a plain string)."""
    def unknown(key: str, name: str) -> bool:
        raise ConfigError(f"unknown key '{key}' for evaluate{did_you_mean(key, _KEYS)}")

    if isinstance(values.get("sample_dirs"), str):  # one folder given as a plain string
        values = {**values, "sample_dirs": [values["sample_dirs"]]}
    try:
        config = read(EvaluateConfig, values, unknown=unknown)
        config.validate()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def config_to_dict(config: EvaluateConfig) -> dict[str, Any]:
    return to_json_dict(config)

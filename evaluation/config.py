"""The evaluation's typed config: JSON file keys, command-line options and `--set key=value`, checked strictly.

Precedence: defaults < JSON config < command-line options < `--set`. A key that is unknown, of the wrong type or
out of range raises a one-line `ConfigError` naming the source and the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guided_diffusion.config import did_you_mean
from guided_diffusion.data import RESIZE_MODES, canonical_dataset_mode
from guided_diffusion.errors import ConfigError

from .mixes import parse_mixes

SYNTHETIC_LABELS = ("raw", "filtered")
"""Which labels of the sample folders train the segmenters: labels/ as sampled, or labels_filtered/ (255 =
ignored pixels) less the images the filter dropped."""

ARCHITECTURE_NAMES = ("unetplusplus", "fpn", "deeplabv3plus", "unet")
"""Segmenters accepted in `models` (segmentation_models_pytorch's Unet++, FPN, DeepLabV3+ and U-Net)."""
_ARCHITECTURE_ALIASES = {"unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus"}


def canonical_architecture(name: str, key: str = "models") -> str:
    """The architecture name for a spelling such as 'UnetPlusPlus', 'unet++', 'FPN' or 'DeepLabV3+'."""
    lowered = name.lower() if isinstance(name, str) else ""
    lowered = _ARCHITECTURE_ALIASES.get(lowered, lowered)
    if lowered not in ARCHITECTURE_NAMES:
        raise ConfigError(f"key '{key}': unknown segmenter {name!r}; use one of {', '.join(ARCHITECTURE_NAMES)}")
    return lowered


@dataclass(frozen=True)
class EvaluateConfig:
    """Every setting of an evaluation run, with its default."""

    data_dir: str = ""
    sample_dirs: list[str] = field(default_factory=list)
    mixes: list[str] = field(default_factory=lambda: ["RALLF000", "RALLFALL"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    models: list[str] = field(default_factory=lambda: ["unetplusplus", "fpn", "deeplabv3plus"])
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    dataset_mode: str = "multi-class"
    num_classes: int | None = None
    image_size: int = 256
    resize_mode: str = "resize"
    batch_size: int = 8
    steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    device: str = "auto"
    root_log_dir: str = "Results"
    label_alignment: bool = True
    inception_weights: str | None = None
    synthetic_labels: str = "raw"
    background_class: int | None = 0
    ignore_index: int | None = None


# what each key accepts, for the type check and its message
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "data_dir": ((str,), "a folder path"),
    "sample_dirs": ((list,), "a list of sample run folders"),
    "mixes": ((list,), "a list of mix names such as [\"RALLF000\", \"RALLF100\"]"),
    "seeds": ((list,), "a list of integers"),
    "models": ((list,), "a list of segmenter names"),
    "encoder": ((str,), "an encoder name such as \"resnet18\""),
    "encoder_weights": ((str, type(None)), "a weights file path or null"),
    "dataset_mode": ((str,), "\"multi-class\" or \"binary\""),
    "num_classes": ((int, type(None)), "an integer or null"),
    "image_size": ((int,), "an integer"),
    "resize_mode": ((str,), " or ".join(f'"{m}"' for m in RESIZE_MODES)),
    "batch_size": ((int,), "an integer"),
    "steps": ((int,), "an integer"),
    "lr": ((int, float), "a number"),
    "weight_decay": ((int, float), "a number"),
    "augment": ((bool,), "true or false"),
    "device": ((str,), "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
    "root_log_dir": ((str,), "a folder path"),
    "label_alignment": ((bool,), "true or false"),
    "inception_weights": ((str, type(None)), "a weights file path or null"),
    "synthetic_labels": ((str,), "\"raw\" (labels/) or \"filtered\" (labels_filtered/ of evaluation/filter.sh)"),
    "background_class": ((int, type(None)), "the class id left out of 'without background' means, or null for none"),
    "ignore_index": ((int, type(None)), "a label value that losses and metrics skip (e.g. 255), or null"),
}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _check(config: EvaluateConfig) -> None:
    """Range and content checks that need more than a type (raises ConfigError naming the key)."""
    if not config.data_dir:
        raise ConfigError("key 'data_dir' is required: the dataset folder with train/ and test/")
    for key in ("sample_dirs", "mixes", "models"):
        values = getattr(config, key)
        if not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"key '{key}' must be {_TYPES[key][1]}, got {json.dumps(values)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in config.seeds):
        raise ConfigError(f"key 'seeds' must be a list of integers, got {json.dumps(config.seeds)}")
    for key in ("mixes", "seeds", "models"):
        if not getattr(config, key):
            raise ConfigError(f"key '{key}' must not be empty")
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"key 'seeds' lists a seed twice: {config.seeds}")
    parse_mixes(config.mixes)
    architectures = [canonical_architecture(name) for name in config.models]
    if len(set(architectures)) != len(architectures):
        raise ConfigError(f"key 'models' lists a segmenter twice: {config.models}")
    canonical_dataset_mode(config.dataset_mode)
    if config.num_classes is not None and config.num_classes < 2:
        raise ConfigError(f"key 'num_classes' must be at least 2 (background + 1 class), got {config.num_classes}")
    if config.image_size < 32 or config.image_size % 32:
        raise ConfigError(f"key 'image_size' must be a multiple of 32 (the encoders downsample 32 times), "
                          f"got {config.image_size}")
    if config.resize_mode not in RESIZE_MODES:
        raise ConfigError(f"key 'resize_mode' must be {_TYPES['resize_mode'][1]}, got {config.resize_mode!r}")
    if config.batch_size < 2:
        raise ConfigError(f"key 'batch_size' must be at least 2 (batch norm needs two images), got {config.batch_size}")
    if config.steps < 1:
        raise ConfigError(f"key 'steps' must be at least 1, got {config.steps}")
    if not config.lr > 0 or config.weight_decay < 0:
        raise ConfigError(f"keys 'lr' and 'weight_decay' must be > 0 and >= 0, got {config.lr} and "
                          f"{config.weight_decay}")
    if config.synthetic_labels not in SYNTHETIC_LABELS:
        raise ConfigError(f"key 'synthetic_labels' must be {_TYPES['synthetic_labels'][1]}, got "
                          f"{config.synthetic_labels!r}")
    if config.background_class is not None and config.background_class < 0:
        raise ConfigError(f"key 'background_class' must be a class id >= 0 or null, got {config.background_class}")
    if config.num_classes is not None:
        check_label_keys(config.background_class, config.ignore_index, config.num_classes)
    if config.ignore_index is not None:
        if not 0 <= config.ignore_index <= 255:
            raise ConfigError(f"key 'ignore_index' must be a label value in 0..255 or null, got {config.ignore_index}")
        if config.synthetic_labels == "filtered" and config.ignore_index != 255:
            raise ConfigError(f"key 'ignore_index' is {config.ignore_index} but filtered labels mark ignored pixels "
                              "with 255; use 255 or leave it null")
    if config.device != "auto" and config.device != "cpu" and not config.device.startswith("cuda"):
        raise ConfigError(f"key 'device' must be {_TYPES['device'][1]}, got {config.device!r}")


def check_label_keys(background_class: int | None, ignore_index: int | None, num_classes: int) -> None:
    """ConfigError when key background_class is no class id, or key ignore_index is one (checked once the number
    of classes is known)."""
    if background_class is not None and background_class >= num_classes:
        raise ConfigError(f"key 'background_class' is {background_class} but the dataset has {num_classes} classes "
                          f"(ids 0..{num_classes - 1}); use null when no class is background")
    if ignore_index is not None and ignore_index < num_classes:
        raise ConfigError(f"key 'ignore_index' {ignore_index} is a class id (0..{num_classes - 1}); use a value no "
                          "class uses, such as 255")


def config_from_dict(values: dict[str, Any], source: str = "config") -> EvaluateConfig:
    """Build and check a config from flat key: value pairs (keys starting with '_' or '#' are comments)."""
    names = [f.name for f in dataclasses.fields(EvaluateConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith(("_", "#")):
            continue
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{key}' for evaluate{did_you_mean(key, names)}")
        if key == "sample_dirs" and isinstance(value, str):
            value = [value]  # one folder given as a plain string
        types, described = _TYPES[key]
        if not _type_ok(value, types):
            raise ConfigError(f"{source}: key '{key}' must be {described}, got {json.dumps(value)}")
        kwargs[key] = float(value) if key in ("lr", "weight_decay") else value
    config = EvaluateConfig(**kwargs)
    try:
        _check(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The key: value pairs of a JSON config file (ConfigError for a missing file or invalid JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object of key: value pairs")
    return values


def config_to_dict(config: EvaluateConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)

"""The segmenter's settings as config keys: its architecture names, and how FreeMask's scorer is trained.

Light on purpose (no torch, no smp): main.py reads these fields for `main.py keys` (the `hardness_args.scorer`
section of docs/configuration.md), and the configs of evaluate.sh and the study check their architecture names
here. A sample config's `hardness_args.scorer` is an object guided_diffusion keeps as it is given (the engine knows
no segmenter); `ScorerSettings.of_sample_config` reads it strictly, with the same one-line errors as any key, and
main.py and the study call it before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from guided_diffusion.config import option
from guided_diffusion.config_io import read, require, to_json_dict, within
from guided_diffusion.data import RESIZE_MODES
from guided_diffusion.errors import ConfigError

ARCHITECTURE_NAMES = ("unetplusplus", "fpn", "deeplabv3plus", "unet")
"""Segmenters accepted in `models` (evaluate.sh), `segmenter.architecture` (the study) and `scorer.architecture`
(FreeMask): segmentation_models_pytorch's Unet++, FPN, DeepLabV3+ and U-Net."""
_ARCHITECTURE_ALIASES = {"unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus"}
SCORER_KEY = "hardness_args.scorer"
"""Where a sample config holds the scorer's settings (the key its errors name)."""


def canonical_architecture(name: str, key: str = "models") -> str:
    """The architecture name for a spelling such as 'UnetPlusPlus', 'unet++', 'FPN' or 'DeepLabV3+'."""
    lowered = name.lower() if isinstance(name, str) else ""
    lowered = _ARCHITECTURE_ALIASES.get(lowered, lowered)
    if lowered not in ARCHITECTURE_NAMES:
        raise ConfigError(f"key '{key}': unknown segmenter {name!r}; use one of {', '.join(ARCHITECTURE_NAMES)}")
    return lowered


@dataclass(frozen=True)
class ScorerSettings:
    """How a FreeMask scorer (evaluation/freemask.py) is trained: the `hardness_args.scorer` sub-keys of a sample
    config, and the `--scorer-*` options of evaluation/filter.sh; part of the scorer's cache key. `image_size` None =
    the size of what it scores (the samples' size)."""

    architecture: str = option("fpn", "smp segmenter (`unetplusplus`, `fpn`, `deeplabv3plus`, `unet`), random init",
                               canonical=canonical_architecture)
    encoder: str = option("resnet18", "smp encoder of the segmenter, random init")
    image_size: int | None = option(None, "size it is trained and scores at; multiple of 32; `null` = the samples' "
                                          "size (filter) / the sampling `image_size` (hardness)")
    resize_mode: str = option("resize", "how the real images are brought to that size: `resize` (stretch) or `crop` "
                                        "(short side + centre crop)")
    steps: int = option(1000, "optimizer steps of its training (AdamW with cosine decay, as for `evaluate.sh`)")
    batch_size: int = option(8, "images per step; >= 2")
    lr: float = option(1e-3, "learning rate; > 0")
    weight_decay: float = option(1e-4, "AdamW weight decay; >= 0")
    augment: bool = option(True, "random horizontal and vertical flips")
    seed: int = option(0, "seed of its training run")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "scorer") -> ScorerSettings:
        """Read and check the settings strictly (one-line ConfigError naming '<where>.<key>')."""
        settings = read(cls, values, where)
        with within(where):
            settings.validate()
        return settings

    @classmethod
    def of_sample_config(cls, config: Any, source: str = "") -> ScorerSettings:
        """The scorer settings of a sample config's `hardness_args` (its `scorer` object, read strictly; a mistake
        is one ConfigError line "<source>: key 'hardness_args.scorer.<key>' ...", as the config's other keys); the
        defaults when the config has no hardness_args."""
        args = getattr(config, "hardness_args", None)
        try:
            return cls.from_dict(args.scorer if args is not None else {}, SCORER_KEY)
        except ConfigError as error:
            if not source:
                raise
            raise ConfigError(f"{source}: {error}") from None

    def validate(self) -> None:
        size = self.image_size
        require(size is None or (size >= 32 and size % 32 == 0), "image_size",
                f"must be a multiple of 32 (the encoders downsample 32 times) or null, got {size}")
        require(self.resize_mode in RESIZE_MODES, "resize_mode",
                f"must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        require(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        require(self.batch_size >= 2, "batch_size", f"must be at least 2 (batch norm needs two images), got "
                                                    f"{self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")

    def at_size(self, image_size: int) -> ScorerSettings:
        """These settings with image_size filled in when it was left to the data (None)."""
        return self if self.image_size is not None else dataclasses.replace(self, image_size=image_size)

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)

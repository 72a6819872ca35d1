"""Training the mask generator (`main.py masks`): the SDM's Trainer on encoded masks, conditioned on presence.

The loop, run folders (`masks_NNN/`), EMA, best epoch, exact resume, progress bar, stop signals and several
processes are train.py's. What differs (see model.py for why):
- the items: each train/ mask at the generator's image_size, its "image" the one-hot mask scaled to [-1, 1];
- the process: it may predict v instead of eps (key `prediction`; see model.py);
- the loss: with `class_weight_power` each pixel's squared error is weighted by its class's rarity;
- the condition: the network gets the presence vector of the batch's label map (PresenceConditioned), so the
  Trainer's null-label dropout (drop_rate = presence_drop) drops it;
- the checkpoints also hold the table of the training masks' presence vectors (sampling draws from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..balance import load_masks
from ..config import MaskTrainConfig, config_from_dict
from ..diffusion import GaussianDiffusion
from ..errors import CheckpointError, ConfigError
from ..train import Trainer, TrainResult, build_diffusion, run_training, train_action
from .model import (ACTION, FORMAT, EncodedMaskDataset, PresenceConditioned, PresenceTable,
                    with_legacy_keys)


class MaskTrainer(Trainer):
    """The SDM's Trainer on encoded masks, conditioned on their presence vectors."""

    presence_table: PresenceTable
    class_weights: torch.Tensor  # float32 K: each class's pixel weight in the loss (class_weight_power)

    def __init__(self, config: MaskTrainConfig, action: str = ACTION, log=print):
        super().__init__(config, action, log)
        self.forward = PresenceConditioned(self.forward)
        rates = ", ".join(f"{name} {100 * rate:.0f}%" for name, rate in
                          zip(self.class_names, self.presence_table.class_rates()))
        self.log(f"mask generator: {len(self.dataset)} masks at {config.image_size} px; share holding each class: "
                 f"{rates}")

    def network_of(self, module: torch.nn.Module):
        return PresenceConditioned(module)

    def check_start(self, payload: dict[str, Any], path: Path) -> None:
        """Resume a masks run (or start from its weights) only: an image model's checkpoint, or a generator that
        predicts the other target (`prediction`: its weights would be read as the wrong one), is refused in one
        line."""
        if "mask_generator" not in payload:
            raise CheckpointError(f"resume_checkpoint {str(path)!r}: not a mask generator checkpoint; a masks run "
                                  f"starts from a masks run only")
        trained = with_legacy_keys(payload.get("config") or {})["prediction"]
        if trained != self.config.prediction:
            raise ConfigError(f"resume_checkpoint {str(path)!r}: that generator predicts {trained}, this run's "
                              f"'prediction' is {self.config.prediction}; set \"prediction\": \"{trained}\" to "
                              f"continue it")

    def make_diffusion(self, config: MaskTrainConfig) -> GaussianDiffusion:
        return build_diffusion(config, config.prediction)

    def make_dataset(self, config: MaskTrainConfig) -> torch.utils.data.Dataset:
        masks = load_masks(self.train_pairs, config.image_size, config.dataset_mode, config.resize_mode)
        self.presence_table = PresenceTable.of_masks(masks, config.num_classes)
        self.class_weights = class_weights(self.presence_table.class_pixel_shares(), config.class_weight_power)
        return EncodedMaskDataset(masks, config.num_classes)

    def pixel_weights(self, images: torch.Tensor) -> torch.Tensor | None:
        """Each pixel's class weight (`class_weight_power`), from the encoded masks' argmax; None when off."""
        if not self.config.class_weight_power:
            return None
        return self.class_weights.to(images.device)[images.argmax(dim=1, keepdim=True)]

    def _payload(self, full: bool) -> dict[str, Any]:
        payload = super()._payload(full)
        payload["mask_generator"] = {"format": FORMAT, "presence": self.presence_table.to_dict(),
                                     "class_names": list(self.class_names)}
        return payload


def class_weights(shares: np.ndarray, power: float) -> torch.Tensor:
    """Per class, (its share `shares` of the training pixels)^-power, scaled so the pixels' mean weight is 1
    (float32 K). The one-hot MSE is mostly background pixels (94 % on magnetic-tile), so a generator learns little
    of the small classes; power 1 gives every class the same total weight. A class no mask holds gets weight 0
    (it has no pixel to weigh)."""
    weights = np.where(shares > 0, np.maximum(shares, 1e-12) ** -power, 0.0)
    return torch.tensor(weights / max(float((shares * weights).sum()), 1e-12), dtype=torch.float32)


def mask_config(values: dict[str, Any], source: str = "config") -> MaskTrainConfig:
    """A strict, validated mask generator config from JSON values (one ConfigError line naming the key)."""
    config, _ = config_from_dict(ACTION, values, source)
    return config


def train_mask_generator(config: MaskTrainConfig | dict[str, Any], log=print) -> TrainResult:
    """Train a mask generator on `data_dir`'s train/ masks into a fresh `<root_log_dir>/masks_NNN/`; starts as
    `main.py train` does (auto_resume: the newest latest.pt of an earlier masks run; else resume_checkpoint).
    Returns the Trainer's TrainResult (run_dir, checkpoints, state, stop reason)."""
    if isinstance(config, dict):
        config = mask_config(config)
    return run_training(config, ACTION, log, MaskTrainer)


def masks_action(config: MaskTrainConfig, log=print) -> int | None:
    """`main.py masks`: train_mask_generator, with train's exit status (75 = stopped by a signal, requeue)."""
    return train_action(config, ACTION, log, MaskTrainer)

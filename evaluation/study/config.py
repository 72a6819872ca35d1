"""The low-data study's typed config (`evaluation/experiment.sh -c configs/experiment_<name>.json`).

A study asks one question of a dataset: when only a fraction of the labelled images is there, does synthetic
data raise the mIoU of a segmenter, and which generator's data does it best? Its config names the dataset, the
real fractions to draw, the segmenter protocol, the SDM's train / finetune keys (those of `main.py train` and
`main.py finetune`), the generators (each a `main.py sample` config: an SDM mode, or `paste`), and the variants:
the training sets compared, each real images (or none) + the images of some generators, with an augmentation.

The config is read by the one routine of guided_diffusion/config_io.py (types, unknown keys; `segmenter`, each
generator and each variant are dataclasses read the same way), then checked by `StudyConfig.validate()`, which
holds the checks across keys (a variant's generators exist, a filtered generator's source, ...). Every key is
checked before anything runs; a mistake is one `ConfigError` line naming the key; the keys of `sdm` and of each
generator's `sample` are checked as the actions' configs once the dataset is known (study.check_study).
`--quick` runs the same study at toy size (see QUICK): every stage, a few minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guided_diffusion.config_io import (did_you_mean, read, read_config_file, require,
                                        setting, within)
from guided_diffusion.config import parse_override
from guided_diffusion.data import RESIZE_MODES, canonical_dataset_mode
from guided_diffusion.errors import ConfigError

from ..freemask import FilterSettings
from ..segmenter.model import AUGMENTATIONS
from ..segmenter.pretrained import encoder_weights_problem
from ..segmenter.settings import canonical_architecture

GENERATOR_KINDS = ("sdm", "paste")
"""What makes a generator's images: the study's SDM (trained on the subset) sampled with the generator's sample
keys, or copy-paste of real defects onto real defect-free images (sample mode "paste", no model)."""

LABELS = ("raw", "filtered")
PRECISIONS = ("auto", "fp32", "bf16")
SDM_KEYS = ("model", "train", "finetune")
SET_BY_THE_STUDY = ("data_dir", "root_log_dir", "num_classes", "dataset_mode", "image_size")
"""Keys of the SDM's and the generators' configs that the study sets (from its own keys and the subset)."""
MASKS_SET_BY_THE_STUDY = ("data_dir", "root_log_dir", "num_classes", "dataset_mode", "resume_checkpoint",
                          "auto_resume")
"""Keys of a generator's mask_generator that the study sets (its image_size, the masks' side, is the user's)."""

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
    "mask_generator": {"image_size": 16, "channel_mult": "1,2", "max_steps": 12, "batch_size": 4,
                       "save_interval": 6},
}
"""What `--quick` changes: toy image size, segmenter steps (and encoder, unless encoder_weights is set), SDM and
mask generator size and steps, and sample counts. Every other key, every stage and every variant stay as
configured."""


@dataclass(frozen=True)
class SegmenterProtocol:
    """How every segmenter of the study is trained and chosen (the same for every variant and seed)."""

    architecture: str = setting("fpn", canonical=canonical_architecture)
    encoder: str = setting("resnet18", expect="an encoder name such as \"resnet18\"")
    # null = random init; "imagenet" = ImageNet weights (an installed package's, else smp's download); or a file
    encoder_weights: str | None = setting(None, expect="\"imagenet\", a weights file path or null")
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    select_every: int = 100
    precision: str = "auto"
    seeds: list[int] = setting(factory=lambda: [0, 1, 2, 3, 4],
                               expect="a list of at least two integers (the paired interval needs two)")

    def fingerprint_keys(self) -> dict[str, Any]:
        """The keys that make a segmenter unit's fingerprint: all but the seeds (each unit's key has its own seed,
        so adding a seed redoes nothing else), and encoder_weights only when set (a study from before the key, or
        with it null, keeps its fingerprints)."""
        keys = dataclasses.asdict(self)
        del keys["seeds"]
        if keys["encoder_weights"] is None:
            del keys["encoder_weights"]
        return keys

    def validate(self) -> None:
        require(bool(self.encoder), "encoder", "must be an encoder name such as \"resnet18\", got \"\"")
        problem = encoder_weights_problem(self.encoder_weights)
        require(problem is None, "encoder_weights", problem or "")
        require(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        require(self.batch_size >= 2, "batch_size", f"must be at least 2 (batch norm needs two images), got "
                                                    f"{self.batch_size}")
        require(self.select_every >= 0, "select_every", f"must be >= 0, got {self.select_every}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.precision in PRECISIONS, "precision",
                f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        require(len(self.seeds) >= 2, "seeds", f"must be a list of at least two integers (the paired interval needs "
                                               f"two), got {json.dumps(self.seeds)}")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", f"lists a seed twice: {self.seeds}")


@dataclass(frozen=True)
class Generator:
    """A source of synthetic pairs: its kind and the `main.py sample` keys it is sampled with; or, with labels
    "filtered", the FreeMask-filtered labels of generator `source`'s images."""

    kind: str = setting("", expect=" or ".join(GENERATOR_KINDS))
    sample: dict[str, Any] = setting(factory=dict, expect="an object of `main.py sample` keys")
    labels: str = "raw"
    source: str | None = setting(None, expect="the name of the generator whose images are filtered")
    filter: FilterSettings = setting(factory=FilterSettings, expect="an object of filter settings")
    # the real fraction whose SDM samples this generator (None: the fraction it is used at). The subsets are
    # nested, so a smaller fraction's SDM saw only images of every larger subset: one SDM serves every fraction
    sdm_fraction: float | None = setting(None, expect="a value of real_fractions or null")
    # keys of the study's `sdm` changed for this generator's SDM (a lever's ablation, e.g. {"train":
    # {"min_snr_gamma": 0}}): it trains an SDM of its own; generators with the same settings share one
    sdm: dict[str, dict[str, Any] | None] = setting(
        factory=dict, expect="an object with 'model', 'train' and/or 'finetune' keys changed from the study's sdm")
    # keys of `main.py masks`: the study trains a mask generator on the fraction's subset, and the SDM paints
    # images for its new masks (sample key mask_source) instead of the subset's masks
    mask_generator: dict[str, Any] | None = setting(None, expect="an object of `main.py masks` keys, or null")

    @property
    def sample_keys(self) -> dict[str, Any]:
        """The `main.py sample` keys its images are made with: `sample`, with mode "paste" for kind paste."""
        return {**self.sample, "mode": "paste"} if self.kind == "paste" else self.sample

    def validate(self) -> None:
        """Its own keys; the study checks its source (StudyConfig.validate)."""
        require(self.kind in GENERATOR_KINDS, "kind", f"must be one of {', '.join(GENERATOR_KINDS)}, got "
                                                      f"{json.dumps(self.kind)}")
        require(self.labels in LABELS, "labels", f"must be \"raw\" or \"filtered\" (FreeMask filtering of another "
                                                 f"generator's images), got {json.dumps(self.labels)}")
        if self.labels == "filtered":
            require(not self.sample, "sample", "does not apply: a filtered generator reuses the images of its source")
            for key in ("sdm_fraction", "sdm", "mask_generator"):
                require(not getattr(self, key), key, "does not apply: a filtered generator reuses the images of "
                                                     "its source")
            return
        require(self.sdm_fraction is None or self.kind == "sdm", "sdm_fraction",
                f"only applies to kind sdm, not {self.kind}")
        require(not self.sdm or self.kind == "sdm", "sdm", f"only applies to kind sdm, not {self.kind}")
        if self.mask_generator is not None:
            require(self.kind == "sdm", "mask_generator", f"only applies to kind sdm, not {self.kind}")
            require("mask_source" not in self.sample, "sample.mask_source",
                    "is set by the study when the generator has a mask_generator; remove one of them")
            for owned in MASKS_SET_BY_THE_STUDY:
                require(owned not in self.mask_generator, f"mask_generator.{owned}", "is set by the study; remove it")
        check_sdm_parts(self.sdm)
        require(self.source is None and self.filter == FilterSettings(), "source",
                "and 'filter' only apply with labels \"filtered\"")
        for owned in SET_BY_THE_STUDY + ("model_path",):
            require(owned not in self.sample, f"sample.{owned}", "is set by the study; remove it")
        if self.kind == "paste":
            require(self.sample.get("mode", "paste") == "paste", "sample.mode",
                    f"must be \"paste\" (or absent) for kind paste, got {json.dumps(self.sample.get('mode'))}")
        else:
            require(self.sample.get("mode", "noise") != "paste", "sample.mode",
                    "is \"paste\"; use kind \"paste\" for copy-paste")


@dataclass(frozen=True)
class Variant:
    """A training set of the study: the real subset (or none) + the pairs of `synthetic` generators."""

    name: str = ""
    synthetic: list[str] = setting(factory=list, expect="a list of generator names")
    real: bool = True
    augment: str = setting("flip", expect=" or ".join(AUGMENTATIONS))
    fractions: list[float] | None = None  # None = every real fraction
    max_synthetic: int = setting(0, expect="an integer >= 0 (0 = all)")  # 0 = every synthetic pair
    # other variants this one is paired against, seed by seed, besides real-only (e.g. a lever's SDM against the
    # default SDM): the report's "Against other variants" table
    versus: list[str] = setting(factory=list, expect="a list of variant names")
    # how its synthetic pairs enter training (segmenter.TrainSettings; the defaults pool them with the real ones)
    synthetic_ratio: float | None = setting(None, expect="a share in [0, 1] or null")
    synthetic_weight: float = setting(1.0, expect="a number >= 0")
    real_finetune_share: float = setting(0.0, expect="a share in [0, 1)")

    @property
    def is_baseline(self) -> bool:
        return self.real and not self.synthetic and self.augment == "flip"

    def validate(self) -> None:
        """Its own keys; the study checks its generators and fractions (StudyConfig.validate)."""
        require(self.augment in AUGMENTATIONS, "augment",
                f"must be one of {', '.join(AUGMENTATIONS)}, got {json.dumps(self.augment)}")
        require(self.max_synthetic >= 0, "max_synthetic",
                f"must be an integer >= 0 (0 = all), got {self.max_synthetic}")
        require(self.synthetic_ratio is None or 0.0 <= self.synthetic_ratio <= 1.0, "synthetic_ratio",
                f"must be a share of each batch in [0, 1] or null (pooled), got {self.synthetic_ratio}")
        require(self.synthetic_weight >= 0.0, "synthetic_weight",
                f"must be >= 0 (1 = as a real image), got {self.synthetic_weight}")
        require(0.0 <= self.real_finetune_share < 1.0, "real_finetune_share",
                f"must be in [0, 1) (0 = off), got {self.real_finetune_share}")
        mixes = (self.synthetic_ratio is not None or self.synthetic_weight != 1.0 or self.real_finetune_share > 0)
        require(not mixes or (self.real and bool(self.synthetic)), "synthetic_ratio",
                "and synthetic_weight / real_finetune_share tell real from synthetic images: the variant needs both "
                "(real true and a synthetic generator)")

    def recipe(self) -> dict[str, Any]:
        """What decides its segmenters: not `fractions` (where it runs: running it at one more fraction reuses the
        segmenters trained at the others) nor `versus` (a report); the synthetic-data keys only when set, so the
        variants of studies from before them keep their fingerprints."""
        values = dataclasses.asdict(self)
        for key, default in (("fractions", ...), ("versus", ...), ("synthetic_ratio", None),
                             ("synthetic_weight", 1.0), ("real_finetune_share", 0.0)):
            if default is ... or values[key] == default:
                del values[key]
        return values


@dataclass(frozen=True)
class StudyConfig:
    data_dir: str = setting("", expect="a folder path")
    output_dir: str = setting("", expect="a folder path")
    dataset_mode: str = setting("multi-class", canonical=lambda mode, key: canonical_dataset_mode(mode))
    num_classes: int | None = setting(None, expect="an integer >= 0 or null")
    background_class: int | None = setting(0, expect="an integer >= 0 or null")
    ignore_index: int | None = setting(None, expect="an integer >= 0 or null")
    seed: int = 0
    val_fraction: float = 0.15
    real_fractions: list[float] = setting(factory=lambda: [0.25, 1.0], expect="a list of fractions in (0, 1]")
    image_size: int = 128
    resize_mode: str = setting("resize", expect=" or ".join(RESIZE_MODES))
    device: str = setting("auto", expect="'auto', 'cpu' or 'cuda[:N]'")
    segmenter: SegmenterProtocol = setting(factory=SegmenterProtocol, expect="an object of segmenter settings")
    sdm: dict[str, dict[str, Any] | None] = setting(
        factory=dict, expect="an object with 'model', 'train' and 'finetune' keys")
    generators: dict[str, Generator] = setting(factory=dict, expect="an object of name: {kind, sample}")
    variants: list[Variant] = setting(factory=list, expect="a non-empty list of variants")
    # where this config's report goes inside output_dir ("" = output_dir itself), so that several configs that
    # share one study folder (its SDMs, images and segmenters) keep a report each
    report_dir: str = setting("", expect="a folder path inside output_dir")
    # other study configs whose results, read from this study's folder, the report shows beside its own (e.g.
    # the same study with random-init segmenters)
    beside: list[str] = setting(factory=list, expect="a list of study config file paths")
    quick: bool = False  # set by --quick (study_from_dict), not by the file

    def sdm_settings(self, name: str) -> dict[str, Any]:
        """The `sdm` keys (model, train, finetune) of generator `name`'s SDM: the study's, with its changes."""
        merged = copy.deepcopy(self.sdm)
        for part, keys in self.generators[name].sdm.items():
            if keys is None or merged.get(part) is None:
                merged[part] = copy.deepcopy(keys)  # finetune null: none; a part the study lacks: taken whole
            else:
                merged[part] = {**merged[part], **keys}
        return merged

    def mask_generator_keys(self, data_dir: str, num_classes: int) -> dict[str, Any]:
        """The keys every mask generator config of the study shares: the data, the device, and the void value
        (`ignore_index`, multi-class masks only; left out when there is none, so that the units of a study without
        one keep their fingerprints)."""
        void = {"ignore_index": self.ignore_index} if self.ignore_index is not None and \
            self.dataset_mode == "multi-class" else {}
        return {"data_dir": data_dir, "dataset_mode": self.dataset_mode, "num_classes": num_classes,
                "device": self.device, **void}

    def generator_keys(self, data_dir: str, num_classes: int) -> dict[str, Any]:
        """The keys every SDM train, finetune and sample config of the study shares: the mask generator's, and
        the image size and how images reach it."""
        return {**self.mask_generator_keys(data_dir, num_classes), "image_size": self.image_size,
                "resize_mode": self.resize_mode}

    def variants_at(self, fraction: float) -> list[Variant]:
        return [v for v in self.variants if v.fractions is None or fraction in v.fractions]

    def generators_at(self, fraction: float) -> list[str]:
        """The generators a fraction's variants use, sources of filtered generators first, else in first-use
        order."""
        used = list(dict.fromkeys(g for v in self.variants_at(fraction) for g in v.synthetic))
        sources = [self.generators[g].source for g in used if self.generators[g].source is not None]
        return list(dict.fromkeys([s for s in sources if s is not None] + used))

    def validate(self) -> None:
        """Every check but the types (done where the file is read): ranges, and the keys that must agree."""
        require(bool(self.data_dir), "data_dir", "is required: the dataset folder with train/ and test/")
        require(bool(self.output_dir), "output_dir",
                "is required: the study's folder (made, or resumed when it holds this study)")
        fractions = self.real_fractions
        require(bool(fractions) and all(0 < f <= 1 for f in fractions), "real_fractions",
                f"must be a list of fractions in (0, 1], got {json.dumps(fractions)}")
        require(len(set(fractions)) == len(fractions), "real_fractions", f"lists a fraction twice: {fractions}")
        for key in ("num_classes", "background_class", "ignore_index"):
            value = getattr(self, key)
            require(value is None or value >= 0, key, f"must be an integer >= 0 or null, got {value}")
        require(0 < self.val_fraction < 0.5, "val_fraction", f"must be in (0, 0.5): the real validation split for "
                                                             f"model selection, got {self.val_fraction}")
        require(self.image_size >= 32 and self.image_size % 32 == 0, "image_size",
                f"must be a multiple of 32 (the segmenters downsample 32 times), got {self.image_size}")
        require(self.resize_mode in RESIZE_MODES, "resize_mode",
                f"must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device",
                f"must be 'auto', 'cpu' or 'cuda[:N]', got {json.dumps(self.device)}")
        inside = Path(self.report_dir)
        require(not inside.is_absolute() and ".." not in inside.parts, "report_dir",
                f"must be a folder inside output_dir (a relative path without '..'), got {json.dumps(self.report_dir)}")
        for position, path in enumerate(self.beside):
            require(Path(path).is_file(), f"beside[{position}]", f"names no file: {json.dumps(path)} (a study config, "
                                                                 "relative to the working directory)")
        with within("segmenter"):
            self.segmenter.validate()
        self._validate_generators()
        self._validate_sdm()
        self._validate_variants()
        self._validate_sdm_fractions()

    def _validate_sdm_fractions(self) -> None:
        """A generator sampled from another fraction's SDM: that SDM's subset lies inside every subset it serves."""
        for name, generator in self.generators.items():
            if generator.sdm_fraction is None:
                continue
            key = f"generators.{name}.sdm_fraction"
            require(generator.sdm_fraction in self.real_fractions, key,
                    f"must be one of real_fractions {self.real_fractions}, got {generator.sdm_fraction}")
            below = [f for f in self.real_fractions if name in self.generators_at(f) and f < generator.sdm_fraction]
            require(not below, key, f"is {generator.sdm_fraction}, but the generator is used at real fraction "
                                    f"{min(below or [0])}: that SDM was trained on images the smaller subset "
                                    "does not hold")

    def _validate_generators(self) -> None:
        require("real" not in self.generators, "generators.real",
                "is a reserved name: the report calls the real subset \"real\" beside the generated sets; rename it")
        for name, generator in self.generators.items():
            with within(f"generators.{name}"):
                generator.validate()
            if generator.labels == "filtered":
                others = [n for n in self.generators if n != name]
                require(generator.source in others, f"generators.{name}.source",
                        f"must name the generator whose images are filtered, got {json.dumps(generator.source)}"
                        f"{did_you_mean(generator.source, others)}")
        for name, generator in self.generators.items():
            if generator.source is not None:
                origin = self.generators[generator.source]
                require(origin.source is None and origin.kind == generator.kind, f"generators.{name}.source",
                        f"must name a generator of raw labels of the same kind ({generator.kind}), got "
                        f"{generator.source!r}")

    def _validate_sdm(self) -> None:
        """The keys of `sdm` are the actions' (checked as train / finetune configs by study.check_study)."""
        check_sdm_parts(self.sdm)
        if any(g.kind == "sdm" for g in self.generators.values()):
            require(bool(self.sdm.get("train")), "sdm.train", "is required: an SDM generator is used")

    def _validate_variants(self) -> None:
        require(bool(self.variants), "variants", "must be a non-empty list of variants")
        for position, variant in enumerate(self.variants):
            require(bool(variant.name), f"variants[{position}].name", "must be a non-empty string")
            where = f"variants.{variant.name}"
            with within(where):
                variant.validate()
            require(variant.real or bool(variant.synthetic), where,
                    "has no training images (real false and no synthetic generators)")
            for name in variant.synthetic:
                require(name in self.generators, f"{where}.synthetic",
                        f"names generator {name!r}, which 'generators' does not define"
                        f"{did_you_mean(name, list(self.generators))}")
            require(variant.fractions is None or all(f in self.real_fractions for f in variant.fractions),
                    f"{where}.fractions", f"must list values of real_fractions {self.real_fractions}, got "
                                          f"{json.dumps(variant.fractions)}")
        names = [v.name for v in self.variants]
        for name in names:
            require(names.count(name) == 1, "variants", f"names variant {name!r} twice")
        for variant in self.variants:
            for other in variant.versus:
                require(other in names and other != variant.name, f"variants.{variant.name}.versus",
                        f"must name other variants of the study, got {other!r}{did_you_mean(other, names)}")
        for fraction in self.real_fractions:
            baselines = sum(v.is_baseline for v in self.variants_at(fraction))
            require(baselines >= 1, "variants",
                    f"has no real-only baseline at real fraction {fraction} (real true, no synthetic, augment "
                    "\"flip\"); the paired differences are taken to it")
            require(baselines == 1, "variants", f"has more than one real-only baseline at real fraction {fraction}")


def check_sdm_parts(sdm: dict[str, Any]) -> None:
    """The parts of an `sdm` object (the study's, or a generator's changes to it): model / train / finetune, each
    an object of config keys (finetune may be null: no finetuning) without the keys the study sets itself."""
    for key, part in sdm.items():
        require(key in SDM_KEYS, f"sdm.{key}", f"is unknown{did_you_mean(key, list(SDM_KEYS))}; sdm takes "
                                               f"{', '.join(SDM_KEYS)}")
        require(isinstance(part, dict) or (key == "finetune" and part is None), f"sdm.{key}",
                "must be an object of config keys" + (" (or null: no finetuning)" if key == "finetune" else ""))
        for owned in SET_BY_THE_STUDY + ("resume_checkpoint", "auto_resume"):
            require(owned not in (part or {}), f"sdm.{key}.{owned}", "is set by the study; remove it")


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
    segmenter, quick_segmenter = values.get("segmenter") or {}, dict(QUICK["segmenter"])
    if isinstance(segmenter, dict) and segmenter.get("encoder_weights") is not None:
        del quick_segmenter["encoder"]  # weights fit their own encoder only (a file made for it, or its ImageNet's)
    values["segmenter"] = deep_merge(segmenter, quick_segmenter)
    sdm = values.get("sdm") or {}
    values["sdm"] = {key: deep_merge(sdm.get(key) or {}, QUICK["sdm"].get(key, {})) for key in SDM_KEYS
                     if key in sdm or key in QUICK["sdm"]}
    if sdm.get("finetune") is None and "finetune" in sdm:
        values["sdm"]["finetune"] = None
    generators = values.get("generators") or {}
    for name, generator in generators.items():
        if isinstance(generator, dict) and generator.get("labels", "raw") == "raw":
            generator["sample"] = deep_merge(generator.get("sample") or {}, QUICK["sample"])
            if isinstance(generator.get("mask_generator"), dict):
                generator["mask_generator"] = deep_merge(generator["mask_generator"], QUICK["mask_generator"])
            changes = generator.get("sdm")
            if isinstance(changes, dict):  # its own SDM at toy size too (the parts it changes)
                generator["sdm"] = {part: deep_merge(keys, QUICK["sdm"].get(part, {})) if isinstance(keys, dict)
                                    else keys for part, keys in changes.items()}
    fractions = values.get("real_fractions") or []
    if isinstance(fractions, list):
        values["real_fractions"] = fractions[: QUICK["real_fractions_max"]]
    return values


SHARED_SPLIT_KEYS = ("data_dir", "dataset_mode", "seed", "val_fraction", "image_size", "resize_mode")
"""Keys a `beside` config must share with its study: they make the split and the subsets in the shared folder."""


def load_beside(config: StudyConfig) -> list[StudyConfig]:
    """The `beside` configs of a study, each to be read from the study's folder (its output_dir replaced by the
    study's, at toy size with --quick). One line names the file and key when one cannot be read, or draws another
    split: its subsets would replace the study's own in the shared folder."""
    configs = []
    for position, path in enumerate(config.beside):
        try:
            values = {**read_config_file(path), "output_dir": config.output_dir}
            other = study_from_dict(values, path, config.quick)
        except ConfigError as error:
            raise ConfigError(f"key 'beside[{position}]': {error}") from None
        for key in SHARED_SPLIT_KEYS:
            require(getattr(other, key) == getattr(config, key), f"beside[{position}]",
                    f"{path} has {key} {json.dumps(getattr(other, key))} where this study has "
                    f"{json.dumps(getattr(config, key))}: a config beside it must draw the same split")
        configs.append(dataclasses.replace(other, beside=[]))  # one level: its own beside is not read
    return configs


def study_from_dict(values: dict[str, Any], source: str, quick: bool = False) -> StudyConfig:
    """Read and check the study config (with `quick`, at toy size); ConfigError names `source` and the key."""
    try:
        require("quick" not in values, "quick", "is set by the --quick option, not in the file")
        config = read(StudyConfig, apply_quick(values) if quick else values)
        config = dataclasses.replace(config, quick=quick)
        config.validate()
    except ConfigError as error:
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
    config = study_from_dict(values, str(path), quick)
    try:
        load_beside(config)  # checked before anything runs; read again by the report
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config, values

"""Building the model and choosing where and in which precision it runs; shared by every stage.

Training, sampling, inpainting, pasting (image channels only), the hardness scorer and the evaluation all build the
same SDM UNet from a config, on the device of key `device`, under the precision of key `precision`; none of them
needs the training loop for that.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TypeVar

import torch

from . import distributed
from .config import CommonConfig
from .data import Pair, first_colour_image
from .errors import ConfigError
from .unet import SDMUNet

ConfigT = TypeVar("ConfigT", bound=CommonConfig)


def build_model(config: CommonConfig) -> SDMUNet:
    """The SDM UNet a train or sample config describes (its model keys, `config.unet_spec()`)."""
    return SDMUNet(config.unet_spec())


def select_device(name: str) -> torch.device:
    """The device for key 'device'. With several processes, 'auto' and 'cuda' mean this process's GPU (the
    current device, set to LOCAL_RANK when the process group was set up)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"key 'device' is {name!r} but no CUDA GPU is available; use 'auto' or 'cpu'")
    if name in ("auto", "cuda") and torch.cuda.is_available() and distributed.current_world().size > 1:
        return torch.device("cuda", torch.cuda.current_device())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def processor_name(device: torch.device | None = None) -> str:
    """The model of the processor a run computes on: the GPU's name on CUDA, else the CPU's (Linux's
    /proc/cpuinfo, `cpu_model`; the platform's processor string elsewhere). bf16 scores differ between CPU
    models, so the study records it with each unit."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = cpu_model(handle.read())
        if name:
            return name
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def cpu_model(cpuinfo: str) -> str:
    """The first CPU's model in /proc/cpuinfo's text: its model name, with its family and model numbers where
    the file gives them ("AMD EPYC (family 25, model 17)"). A virtual machine often shows only a generic name,
    which two CPU generations share (an AMD EPYC with native bf16 and one without), and their bf16 scores
    differ; the numbers tell them apart. "" when the text names no model."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: every core of a machine is the same model
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name", "")
    if name and fields.get("cpu family") and fields.get("model"):
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


@functools.lru_cache(maxsize=None)
def cpu_bf16_support() -> str:
    """How this CPU runs bf16: "native" (avx512_bf16 or amx_bf16 instructions), "emulated" (oneDNN's bf16 kernels
    on AVX-512 without them, by conversion) or "none". Each probe is guarded, as their APIs vary across versions."""
    try:
        capabilities = torch.cpu.get_capabilities()
        if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
            return "native"
    except Exception:  # older torch: no get_capabilities
        pass
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "emulated"
    except Exception:
        pass
    return "none"


def bf16_autocast(precision: str, device: torch.device) -> bool:
    """Whether key `precision` ("fp32", "bf16", "auto"; `use_fp16: true` is "auto") runs the model under bf16
    torch.autocast on `device` (the UNet's GroupNorms and the loss, against fp32 noise, stay fp32).

    "bf16": on CUDA, and on a CPU with bf16 support (native or emulated); else fp32. "auto": bf16 where it was
    measured faster: CUDA GPUs with native bf16 (Ampere and later; bf16 tensor cores, not measured here as no GPU
    was lent) and CPUs with native bf16 instructions. Measured on the CI machine's 2-core AMD EPYC (avx512_bf16, no
    AMX), torch 2.14, 2 threads, median training images/s, fp32 -> bf16:
    - 32 px, num_channels 32, channel_mult 1,2,2, 1 res block, batch 8: 29-31 -> 42-44 (1.4x); one guided sampling
      step of 8 images (a forward of 16): 210 -> 131-136 ms (1.6x);
    - 64 px, num_channels 64, channel_mult 1,2,2,2, 1 res block, batch 4: 4.3 -> 7.0-7.2 (1.65x).
    The same CPU without its bf16 instructions (oneDNN limited by ONEDNN_MAX_CPU_ISA=AVX512_CORE, i.e. emulated):
    32 px 28 -> 14 (0.5x), so "auto" stays fp32 there."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        if precision == "bf16":
            return True
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no including_emulation
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        support = cpu_bf16_support()
        return support == "native" or (precision == "bf16" and support == "emulated")
    return False


def resolve_image_channels(config: ConfigT, pairs: list[Pair], log=print) -> ConfigT:
    """The (train or sample) config with `image_channels` a number: "auto" becomes 1 when every image of `pairs`
    (the dataset's train/ images) is grayscale (a grey file, or RGB with three equal channels), else 3; one log line
    says which."""
    if config.image_channels != "auto":
        return config
    colour = first_colour_image([pair.image for pair in pairs])
    if colour is None:
        log(f"image_channels auto: 1 (all {len(pairs)} train/ images are grayscale); the model makes grey images")
        return dataclasses.replace(config, image_channels=1)
    log(f"image_channels auto: 3 ({colour.name} has colour); the model makes RGB images")
    return dataclasses.replace(config, image_channels=3)

"""Training and sampling speed of the SDM, printed as a table (issue 7's benchmark).

    python benchmarks/speed.py                         # tiny 32 px config on CPU, about a minute
    python benchmarks/speed.py --compare-naive         # + the straightforward fp32 path, as ratios
    python benchmarks/speed.py --config full --device cuda --dtype bf16 --batch-size 8   # ISDM's 256 px model

Columns: config, device, dtype, batch, train images/s, peak memory, sampler, steps, s/image, model FLOP/s and
its share of the device's peak (known GPUs only). FLOPs are counted by torch.utils.flop_counter on one forward
at batch 1; a training step counts 3 forwards (forward + backward), a guided sampling step 2 (cond + null).
Sampling runs with classifier-free guidance s = 1.5, at every step or (--guidance-interval LOW HIGH) only at the
steps whose t/T is in [LOW, HIGH], which run 2 forwards, the others 1. Runs longer than --max-sample-steps are
timed over a process of that many steps and scaled to the full count (marked "~"): the first step once, the
others times (steps - 1). Everything runs once untimed first (warm-up).

"ours" is the product's sampling path (samplers.py, guidance.py: one batched forward for the guided pair, the
masks' SPADE maps computed once per run as `unet.FixedMasks`, per-image noise). "naive" is ISDM's code path,
re-created step for step in isdm_path.py: fp32, ISDM's attention (einsums) instead of PyTorch's fused SDPA
kernel, guidance as two separate forwards per step, SPADE maps recomputed at every forward, ISDM's p_sample
arithmetic, over ISDM's rescaled 300-step schedule. Under the table, each sampling row's time per step is split
into model forward, guidance combine, noise and step arithmetic (naive: forward and the rest).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.config import config_from_dict  # noqa: E402
from guided_diffusion.data import one_hot  # noqa: E402
from guided_diffusion.diffusion import GaussianDiffusion  # noqa: E402
from guided_diffusion.guidance import conditional_denoiser, guided_share  # noqa: E402
from guided_diffusion.model_setup import build_model  # noqa: E402
from guided_diffusion.samplers import PerImageNoise, log_snr_timesteps, run_sampler  # noqa: E402
from benchmarks.isdm_path import IsdmSampler, isdm_attention  # noqa: E402
from guided_diffusion.unet import AttentionBlock, SDMUNet  # noqa: E402

CONFIGS = {
    "tiny": {"num_classes": 6, "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
             "attention_resolutions": "16", "num_head_channels": 32},
    # issue 15's mid-size row: 64 px, 64 channels, 2 res blocks, attention at 32, 16 and 8, 6 classes (run it with
    # --batch-size 4)
    "64px": {"num_classes": 6, "image_size": 64, "num_channels": 64, "num_res_blocks": 2,
             "attention_resolutions": "32,16,8", "num_head_channels": 32},
    # ISDM's default model: 256 px, 256 channels, 6 classes (652 M parameters)
    "full": {"num_classes": 6, "image_size": 256, "num_channels": 256, "num_res_blocks": 2,
             "attention_resolutions": "32,16,8", "num_head_channels": 64},
}
# Dense peak FLOP/s by device name and dtype (vendor data sheets, without sparsity).
DEVICE_PEAKS = {"H100": {"bf16": 989e12, "fp32": 67e12}, "H200": {"bf16": 989e12, "fp32": 67e12},
                "A100": {"bf16": 312e12, "fp32": 19.5e12}, "L40S": {"bf16": 362e12, "fp32": 91.6e12}}


@dataclass
class Row:
    config: str
    device: str
    dtype: str
    batch: int
    path: str
    train_ips: float | None = None
    peak_mib: float | None = None
    sampler: str = ""
    steps: int = 0
    s_per_image: float | None = None
    estimated: bool = False
    flops_per_s: float | None = None
    split: dict[str, float] | None = None  # sampling: seconds per step of the batch, by part


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, kB on Linux


def forward_flops(model: SDMUNet, size: int, classes: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, model.spec.in_channels, size, size, device=device)
    labels = torch.zeros(1, classes, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, device=device), labels)
    return float(counter.get_total_flops())


def time_training(model, diffusion, images, labels, steps: int, autocast: bool, device,
                  optimizer_kind: str = "default") -> float:
    """Training images/s over `steps` timed steps; `optimizer_kind`: AdamW's "default" implementation (foreach),
    "fused" (one kernel for all parameters) or "loop" (one parameter at a time, as in the reference's days)."""
    kind = {"default": {}, "fused": {"fused": True}, "loop": {"foreach": False}}[optimizer_kind]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kind)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        t = torch.randint(0, 1000, (len(images),), generator=generator).to(device)
        noise = torch.randn(images.shape, generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = diffusion.training_losses(lambda x, ts: model(x, ts, labels).float(), images, t,
                                             noise)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * len(images) / (time.perf_counter() - start)


class Stopwatch:
    """Seconds spent inside the callables it wraps, by name (the device synchronised around each call)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, function):
        def timed(*args):
            synchronize(self.device)
            start = time.perf_counter()
            out = function(*args)
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed

    def hook(self, name: str, module: torch.nn.Module) -> list:
        """Time `module`'s calls through forward hooks, so that the module stays itself (the denoiser hands an
        SDMUNet its masks as FixedMasks, a wrapper function the plain tensors); the hooks' handles."""
        started: list[float] = []

        def before(*_):
            synchronize(self.device)
            started.append(time.perf_counter())

        def after(*_):
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started.pop()

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


@dataclass
class SamplingTime:
    """A timed sampling run: seconds per image for the full step count, whether it was timed over fewer steps,
    model forwards per image and step, and the per-step split in seconds (forward, guidance combine, noise, step
    arithmetic; the naive path's loop is one piece, so its split is forward and the rest)."""

    s_per_image: float
    estimated: bool
    forwards: float
    split: dict[str, float]


def sampling_process(sampler: str, steps: int, timed: int) -> GaussianDiffusion:
    """What a sample run of `steps` steps walks, at `timed` of its steps (evenly spread): ISDM's rescaled
    `steps`-step linear schedule for ancestral and ddim (the sample config's default), the model's 1000-step
    process at log-SNR-even timesteps for dpm++2m."""
    if sampler == "dpm++2m":
        model_process = GaussianDiffusion.create(1000, "linear", rescale_timesteps=True)
        return model_process.respaced(log_snr_timesteps(model_process, timed))
    return GaussianDiffusion.create(steps, "linear", str(timed), rescale_timesteps=True)


def time_sampling(model, labels, sampler: str, steps: int, max_steps: int, naive: bool, autocast: bool,
                  device, channels: int = 3, guidance_interval: list[float] | None = None) -> SamplingTime:
    """`steps` steps of `sampler` with guidance s = 1.5 at every step or only inside `guidance_interval`, timed
    over a process of at most max_steps steps spanning the same noise levels. Our path is the product's (batched
    guidance on `FixedMasks`, per-image noise, samplers.py); the naive path is ISDM's (isdm_path.py, ancestral).

    Each run's first step is timed apart: ours computes the masks' SPADE maps there, once per run, so the full
    run costs that step plus (steps - 1) of the others. A warm-up run of the same shapes comes first, on its own
    denoiser, so the timed run starts with no maps kept."""
    timed = min(steps, max_steps)
    diffusion = sampling_process(sampler, steps, timed)
    size = labels.shape[-1]
    clock = Stopwatch(device)
    stamps: list[float] = []

    def stamp(_: int = 1) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        x = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(2)).to(device)
        if naive:
            reference = IsdmSampler(diffusion)
            forward = clock.wrap("forward", model)
            reference.sample(model, x.clone(), labels, 1.5, steps=2)  # warm-up
            stamp()
            reference.sample(forward, x.clone(), labels, 1.5, progress=stamp)
        else:
            noise = PerImageNoise(list(range(len(labels))), (channels, size, size), device)

            def denoiser(network):
                return conditional_denoiser(network, labels, 1.5, guidance_interval=guidance_interval,
                                            time_range=diffusion.model_time_range)

            warm = denoiser(model)
            warm_times = [0.0] + ([sum(guidance_interval) / 2 * diffusion.model_time_range]
                                  if guidance_interval is not None else [])
            for t in warm_times:  # warm-up of each batch shape the run uses (a compiled model compiles each)
                warm(noise(), torch.full((len(labels),), t, device=device))
            denoise = clock.wrap("denoise", denoiser(model))
            start_noise = noise()
            handles = clock.hook("forward", model)
            stamp()
            run_sampler(sampler, diffusion, denoise, start_noise, clock.wrap("noise", noise), progress=stamp)
            for handle in handles:
                handle.remove()
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    total = sum(durations)
    per_step = {"forward": clock.seconds["forward"] / timed}
    if naive:
        per_step["the rest (ISDM's p_sample)"] = total / timed - per_step["forward"]
    else:
        per_step["guidance combine"] = (clock.seconds["denoise"] - clock.seconds["forward"]) / timed
        per_step["noise"] = clock.seconds.get("noise", 0.0) / timed
        per_step["step arithmetic"] = total / timed - sum(per_step.values())
    later = statistics.mean(durations[1:]) if len(durations) > 1 else durations[0]
    seconds = durations[0] + later * (steps - 1)
    return SamplingTime(seconds / len(labels), timed < steps, 1.0 + guided_share(diffusion, guidance_interval),
                        per_step)


def interval_label(guidance_interval: list[float] | None) -> str:
    """' guided t/T 0.1-0.6' after the sampler's name in the table when guidance is limited, else ''."""
    return "" if guidance_interval is None else f" guided t/T {guidance_interval[0]:g}-{guidance_interval[1]:g}"


def measure(args, path: str, sampler_runs: list[tuple[str, int]], quiet: bool = False) -> list[Row]:
    device = torch.device(args.device)
    naive = path == "naive"
    dtype = "fp32" if naive else args.dtype
    autocast = dtype == "bf16"
    torch.manual_seed(0)
    config, _ = config_from_dict("train", {"data_dir": "unused", **CONFIGS[args.config],
                                           "use_checkpoint": args.checkpointing})
    model = build_model(config).to(device)
    if naive:
        for block in model.modules():
            if isinstance(block, AttentionBlock):
                block.attention = isdm_attention
    if args.channels_last and not naive:
        model = model.to(memory_format=torch.channels_last)
    flops = forward_flops(model, config.image_size, config.num_classes, device)
    forward = torch.compile(model) if args.compile and not naive else model
    b, size = args.batch_size, config.image_size
    generator = torch.Generator().manual_seed(1)
    channels = model.spec.in_channels
    images = (torch.rand(b, channels, size, size, generator=generator) * 2 - 1).to(device)
    labels = one_hot(torch.randint(0, config.num_classes, (b, size, size), generator=generator),
                     config.num_classes).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    diffusion = GaussianDiffusion.create(1000, "linear")
    rows = []
    if not naive:  # the table's path names the options that change our path's speed
        path += "".join(f", {name}" for name, on in (("channels-last", args.channels_last),
                                                     (f"{args.optimizer} AdamW", args.optimizer != "default"),
                                                     ("compile", args.compile)) if on)
    if args.train_steps:
        ips = time_training(forward, diffusion, images, labels, args.train_steps, autocast, device,
                            "default" if naive else args.optimizer)
        rows.append(Row(args.config, str(device), dtype, b, path, train_ips=ips, peak_mib=peak_memory_mib(device),
                        flops_per_s=3 * flops * ips))
    forward.eval()
    interval = None if naive else args.guidance_interval
    for sampler, steps in sampler_runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_sampling(forward, labels, sampler, steps, args.max_sample_steps, naive=naive,
                               autocast=autocast, device=device, channels=channels, guidance_interval=interval)
        rows.append(Row(args.config, str(device), dtype, b, path, peak_mib=peak_memory_mib(device),
                        sampler=sampler + interval_label(interval), steps=steps, s_per_image=timing.s_per_image,
                        estimated=timing.estimated, flops_per_s=timing.forwards * flops * steps / timing.s_per_image,
                        split=timing.split))
    if not quiet:
        print(f"# {path}: {args.config} config, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{flops / 1e12:.3f} TFLOP per forward at batch 1, {torch.get_num_threads()} CPU threads", flush=True)
    return rows


def training_pairs(args, first: tuple[float, float]) -> list[tuple[float, float]]:
    """(ours, naive) training images/s: the pair of the table's rows, then `args.repeats` - 1 more, each path
    timed right after the other with a fresh model, so that the machine's drift over a run (another process,
    clocks, heat) falls on both paths of a pair alike."""
    pairs = [first]
    for _ in range(args.repeats - 1):
        ours = measure(args, "ours", [], quiet=True)[0].train_ips
        pairs.append((ours, measure(args, "naive", [], quiet=True)[0].train_ips))
    return pairs


def device_peak(device: str, dtype: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peaks[dtype] for key, peaks in DEVICE_PEAKS.items() if key in name), None)


def print_table(rows: list[Row]) -> None:
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    header = ("config", "device", "path", "dtype", "batch", "train img/s", "peak MiB", "sampler", "steps",
              "s/image", "model TFLOP/s", "% peak")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        peak = device_peak(r.device, r.dtype)
        share = None if peak is None or r.flops_per_s is None else 100 * r.flops_per_s / peak
        s_image = None if r.s_per_image is None else ("~" if r.estimated else "") + format(r.s_per_image, ".3f")
        cells = (r.config, r.device, r.path, r.dtype, str(r.batch), fmt(r.train_ips, ".2f"), fmt(r.peak_mib, ".0f"),
                 r.sampler or "—", str(r.steps or "—"), s_image or "—",
                 fmt(r.flops_per_s and r.flops_per_s / 1e12, ".3f"), fmt(share, ".1f"))
        print("| " + " | ".join(cells) + " |")


def print_split(rows: list[Row]) -> None:
    """Each sampling row's time per step of its batch, in milliseconds, by part."""
    print("\nsampling time per step of the batch (ms):")
    for r in rows:
        if r.split:
            parts = ", ".join(f"{name} {1000 * seconds:.2f}" for name, seconds in r.split.items())
            print(f"  {r.path} {r.dtype} {r.sampler} {r.steps}: {parts}; total {1000 * sum(r.split.values()):.2f}")


def parse_sampler_runs(text: str) -> list[tuple[str, int]]:
    runs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, steps = item.partition(":")
        runs.append((name, int(steps)))
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with the device-dependent defaults filled in (benchmarks/gpu_check.py calls it too)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CUDA, 4 on CPU")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps (0 = skip); "
                        "default: 20 on CUDA, 5 on CPU")
    parser.add_argument("--samplers", default="ancestral:300,ddim:50,dpm++2m:20",
                        help="comma-separated sampler:steps runs")
    parser.add_argument("--max-sample-steps", type=int, default=None,
                        help="time at most this many steps of a run and scale to its full length; default: 60 "
                             "on CUDA, 10 on CPU")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="guide only the sampling steps at diffusion times t/T in [LOW, HIGH] (the sample key "
                             "guidance_interval); the others run one forward")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--optimizer", choices=("default", "fused", "loop"), default="default",
                        help="AdamW's implementation: PyTorch's default (foreach), fused, or a loop over parameters")
    parser.add_argument("--compare-naive", action="store_true",
                        help="also time ISDM's fp32 code path (isdm_path.py: its attention, two-forward "
                             "guidance, 300 rescaled ancestral steps) and print the speed-up of each run over it")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --compare-naive: time training this many times on each path, in (ours, naive) "
                             "pairs, and give the training speed-up as the median of the pairs' ratios")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.train_steps = (20 if cuda else 5) if args.train_steps is None else args.train_steps
    args.max_sample_steps = args.max_sample_steps or (60 if cuda else 10)
    return args


def main() -> None:
    args = parse_args()
    rows = measure(args, "ours", parse_sampler_runs(args.samplers))
    if args.compare_naive:
        naive_rows = measure(args, "naive", [("ancestral", 300)])
        rows += naive_rows
    pairs = []
    if args.compare_naive and args.train_steps:
        pairs = training_pairs(args, (rows[0].train_ips, naive_rows[0].train_ips))
    print_table(rows)
    print_split(rows)
    if len(pairs) > 1:
        print(f"\ntraining images/s in {len(pairs)} (ours, naive) pairs: "
              + ", ".join(f"({ours:.2f}, {naive:.2f})" for ours, naive in pairs))
    if args.compare_naive:
        naive_sample = next(r.s_per_image for r in naive_rows if r.s_per_image)
        print("\nspeed-up over the naive path:")
        if pairs:
            ratios = sorted(ours / naive for ours, naive in pairs)
            spread = f" (median of {len(ratios)} pairs; {ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            print(f"  training: {statistics.median(ratios):.2f}x images/s{spread}")
        for r in rows:
            if r.path == "naive":
                continue
            if r.s_per_image:
                print(f"  sampling {r.sampler} {r.steps} steps: {naive_sample / r.s_per_image:.2f}x less time "
                      f"per image than naive ancestral 300")


if __name__ == "__main__":
    main()

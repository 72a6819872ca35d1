"""The GPU check of issue 15: one Markdown table of what a GPU machine should tell us, within one time budget.

    bash benchmarks/gpu_check.sh                 # on a GPU: ISDM's 256 px model, at most about 8 minutes
    bash benchmarks/gpu_check.sh --tiny          # the tiny config on CPU (CI), well under a minute when idle
    bash benchmarks/gpu_check.sh --out x.md      # the table also goes to x.md (default: $OUT/gpu_check.md, else
                                                 # Results/gpu_check.md); the children's output to x.md.log

Rows, each measured in a child process of its own (a crash, an out-of-memory or a timeout costs only its row):
- parity: the SDM parity fixture's tiny model (../shared/fixtures/sdm_parity/tiny_sdm.pt) in strict fp32 (no TF32)
  against the reference output, and under bf16 autocast against fp32: max abs and relative difference;
- train: ISDM's 256 px model (speed.py --config full: 652 M parameters) images/s and peak memory, eager and
  torch.compile'd, each with and without gradient checkpointing (benchmarks/speed.py's timing, called as a module);
- sample: guided (s = 1.5) seconds per image, ancestral 300 steps (ISDM's count) and dpm++2m 20 (the fast default);
- torchrun: `torchrun --standalone --nproc_per_node 1 main.py train` for a few steps of a tiny model on a demo
  dataset, and a collective over the project's backend ("cpu:gloo,cuda:nccl"; gloo on CPU) in a 1-process group:
  with one process main.py joins no group (distributed.py does for 2+), so NCCL is exercised by that row.

With --tiny, or when there is no CUDA device, everything runs at the tiny size on CPU (gloo, no torch.compile). A
row that cannot run here (compile on CPU, a missing fixture, a timeout, an error) has an empty result and the reason
in its note, never an estimate. Exit status 0 when every row that can run here gave a result, else 1; the table is
written either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARK = "GPU_CHECK_JSON "  # a child's result line
FIXTURE = Path("fixtures") / "sdm_parity" / "tiny_sdm.pt"
FIXTURE_PLACES = (REPO / "shared" / FIXTURE, REPO.parent / "shared" / FIXTURE)
HEADER = ("check", "setting", "result", "peak MiB", "note")
TORCHRUN_STEPS = 3


@dataclass
class Row:
    check: str
    setting: str
    result: str = ""
    peak: str = ""
    note: str = ""
    failed: bool = False  # it should have given a result here and did not


@dataclass
class Plan:
    tiny: bool
    why_tiny: str
    budget: float
    fixture: Path | None
    fixture_sought: str = ""  # where it was looked for
    deadline: float = 0.0

    @property
    def device(self) -> str:
        return "cpu" if self.tiny else "cuda"


# ---------------------------------------------------------------------------------------------------------------
# Children: each prints one MARK line with its result as JSON


def child_speed(argv: list[str]) -> None:
    """speed.py's measurement (its `parse_args` and `measure`), rows as JSON."""
    import torch
    from benchmarks import speed
    args = speed.parse_args(argv)
    rows = speed.measure(args, "ours", speed.parse_sampler_runs(args.samplers))
    peak = speed.device_peak(args.device, args.dtype)
    payload = [{**dataclasses.asdict(r), "share": None if peak is None or r.flops_per_s is None else
                r.flops_per_s / peak, "steps_timed": args.train_steps, "threads": torch.get_num_threads()}
               for r in rows]
    print(MARK + json.dumps(payload), flush=True)


def child_parity(fixture: str, device_name: str) -> None:
    """The fixture's model output: strict fp32 against the reference, bf16 autocast against fp32."""
    import torch
    from guided_diffusion.config import config_from_dict
    from guided_diffusion.model_setup import build_model
    torch.backends.cuda.matmul.allow_tf32 = False  # strict fp32: PyTorch lets cuDNN convolutions use TF32 otherwise
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device_name)
    reference = torch.load(fixture, map_location="cpu", weights_only=True)
    keys = {k: v for k, v in reference["config"].items() if k != "use_fp16"}
    config, _ = config_from_dict("train", {**keys, "data_dir": "unused"}, fixture)
    model = build_model(config)
    model.load_state_dict(reference["state_dict"], strict=True)
    model = model.to(device).eval()
    vectors = reference["vectors"]
    x, t, y = (vectors[k].to(device) for k in ("x0", "t", "y"))
    with torch.no_grad():
        fp32 = model(x, t, y).double()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = model(x, t, y).double()
    expected = vectors["model_out"].to(device).double()
    scale = fp32.abs().max().item()
    print(MARK + json.dumps({
        "fp32_vs_reference": (fp32 - expected).abs().max().item(),
        "bf16_vs_fp32": (bf16 - fp32).abs().max().item(),
        "bf16_relative": (bf16 - fp32).abs().max().item() / scale,
        "bf16_mean_relative": ((bf16 - fp32).abs().mean() / fp32.abs().mean()).item(),
        "scale": scale, "shape": list(fp32.shape)}), flush=True)


def child_collective() -> None:
    """Under torchrun: a process group over the project's backend, an all_reduce of a CUDA (NCCL) or CPU tensor."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # as guided_diffusion/distributed.py
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=2))
    try:
        device = torch.device("cuda" if cuda else "cpu")
        tensor = torch.ones(1 << 20, device=device)
        dist.all_reduce(tensor)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(tensor)
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 10 * 1000
        ok = bool(torch.all(tensor == dist.get_world_size() ** 11).item())
        version = torch.cuda.nccl.version() if cuda else None
        version = ".".join(map(str, version)) if isinstance(version, tuple) else version
        print(MARK + json.dumps({"backend": backend, "world_size": dist.get_world_size(), "ok": ok,
                                 "all_reduce_ms": ms, "nccl": version}), flush=True)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# The parent: run the children within the budget, make the rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def reason_from(output: str, limit: int = 180) -> str:
    """The line of a failed child that says why (its last error-looking line, else its last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line or "Exception" in line]
    text = (errors or lines or ["no output"])[-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Runner:
    def __init__(self, plan: Plan, log_path: Path):
        self.plan = plan
        self.log = log_path.open("w", encoding="utf-8")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if plan.tiny:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the tiny run stays on CPU even on a GPU machine

    def run(self, name: str, command: list[str], cap: float, marked: bool = True) -> tuple[object | None, str]:
        """Run a child within min(cap, the budget left); (its MARK payload or None, the reason when None). A child
        that prints no MARK line (`marked` False: main.py) gives {} when it exits with 0."""
        left = self.plan.deadline - time.monotonic()
        if left < 5:
            return None, f"not run: the check's {self.plan.budget:.0f} s budget was spent"
        timeout = min(cap, left)
        start = time.monotonic()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the child and whatever it started (torchrun's workers)
            output, _ = process.communicate()
            timed_out = True
        seconds = time.monotonic() - start
        self.log.write(f"=== {name} ({seconds:.1f} s, exit {process.returncode}{', timed out' if timed_out else ''})\n"
                       f"$ {' '.join(command)}\n{output}\n")
        self.log.flush()
        print(f"gpu_check: {name}: {seconds:.1f} s{' (timed out)' if timed_out else ''}", file=sys.stderr, flush=True)
        if timed_out:
            return None, (f"timed out after {seconds:.0f} s (limit {timeout:.0f} s of the {self.plan.budget:.0f} s "
                          f"budget)")
        payload = next((line[len(MARK):] for line in output.splitlines() if line.startswith(MARK)),
                       None if marked else "{}")
        if process.returncode != 0 or payload is None:
            return None, f"failed (exit {process.returncode}): {reason_from(output)}"
        return json.loads(payload), ""

    def python(self, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args]

    def torchrun(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def parity_rows(runner: Runner) -> list[Row]:
    plan = runner.plan
    rows = [Row("parity", "fp32 (no TF32) vs ISDM reference, model output"),
            Row("parity", "bf16 autocast vs fp32, model output")]
    if plan.fixture is None:
        why = (f"fixture not found ({plan.fixture_sought}); pass --fixture or copy ../shared/fixtures/sdm_parity "
               f"into shared/fixtures/")
        for row in rows:
            row.note, row.failed = why, True
        return rows
    result, why = runner.run("parity", runner.python("--child", "parity", str(plan.fixture), plan.device), 120)
    if result is None:
        for row in rows:
            row.note, row.failed = why, True
        return rows
    batch = f"tiny_sdm.pt, batch {result['shape'][0]}, {plan.device}, max |output| {result['scale']:.3g}"
    rows[0].result = f"max abs {result['fp32_vs_reference']:.2e}"
    rows[0].note = f"{batch}; test_parity's tolerance is 1e-4"
    rows[1].result = f"max abs {result['bf16_vs_fp32']:.2e}, rel {result['bf16_relative']:.2e}"
    rows[1].note = (f"{batch}; rel = max abs / max abs(fp32); mean abs / mean abs(fp32) "
                    f"{result['bf16_mean_relative']:.2e}")
    return rows


def speed_args(plan: Plan, *extra: str) -> list[str]:
    if plan.tiny:
        return ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch-size", "2", *extra]
    return ["--config", "full", "--device", "cuda", "--dtype", "bf16", "--batch-size", "8", *extra]


def model_name(plan: Plan) -> str:
    return "tiny 32 px (speed.py --config tiny)" if plan.tiny else "ISDM 256 px (speed.py --config full)"


def train_rows(runner: Runner, compiled: bool) -> list[Row]:
    plan, rows = runner.plan, []
    steps = "2" if plan.tiny else "20"
    for checkpointing in (False, True):
        setting = (f"{model_name(plan)}, {'torch.compile' if compiled else 'eager'}, "
                   f"{'gradient checkpointing' if checkpointing else 'no checkpointing'}")
        row = Row("train", setting)
        rows.append(row)
        if compiled and plan.tiny:
            row.note = f"not run: {plan.why_tiny} runs no torch.compile"
            continue
        extra = ["--train-steps", steps, "--samplers", ""]
        extra += ["--checkpointing"] if checkpointing else []
        extra += ["--compile"] if compiled else []
        name = f"train {'compiled' if compiled else 'eager'}{' checkpointing' if checkpointing else ''}"
        result, why = runner.run(name, runner.python("--child", "speed", *speed_args(plan, *extra)),
                                 240 if compiled else 120)
        if result is None:
            row.note, row.failed = why, True
            continue
        r = result[0]
        row.result, row.peak = f"{r['train_ips']:.2f} img/s", f"{r['peak_mib']:.0f}"
        row.note = (f"{r['dtype']}, batch {r['batch']}, {r['steps_timed']} timed steps after 1 warm-up"
                    f"{' (which compiles)' if compiled else ''}; {r['flops_per_s'] / 1e12:.3g} model TFLOP/s"
                    + (f" = {100 * r['share']:.0f}% of peak" if r["share"] else "") + peak_note(plan))
    return rows


def peak_note(plan: Plan) -> str:
    return "; peak MiB = the process's max RSS" if plan.tiny else "; peak MiB = torch.cuda.max_memory_allocated"


FAST_RECIPE_INTERVAL = (0.08, 0.58)
"""The guidance interval (t/T) of the fast recipe in docs/speed.md, timed as the third sample row."""


def sample_rows(runner: Runner) -> list[Row]:
    from guided_diffusion.sampling.sample import DEFAULT_SOLVER_STEPS
    plan, rows = runner.plan, []
    low, high = FAST_RECIPE_INTERVAL
    runs = [("ancestral", 300, "ISDM's sampler and count (same cost per step as its rescaled 300-step schedule)",
             None),
            ("dpm++2m", DEFAULT_SOLVER_STEPS, "the fast default (sampler dpm++2m, steps 0)", None),
            ("dpm++2m", DEFAULT_SOLVER_STEPS, f"the fast recipe of docs/speed.md: guidance only at t/T {low}-{high}",
             FAST_RECIPE_INTERVAL)]
    for sampler, steps, what, interval in runs:
        limited = [] if interval is None else ["--guidance-interval", str(low), str(high)]
        guided = "guided s=1.5" + (f" at t/T {low}-{high}" if limited else "")
        row = Row("sample", f"{model_name(plan)}, {sampler} {steps} steps, {guided}")
        rows.append(row)
        timed = 3 if plan.tiny else steps  # on the GPU every step is timed
        extra = ["--train-steps", "0", "--samplers", f"{sampler}:{steps}", "--max-sample-steps", str(timed),
                 *limited]
        name = f"sample {sampler} {steps}{' interval' if limited else ''}"
        result, why = runner.run(name, runner.python("--child", "speed", *speed_args(plan, *extra)), 180)
        if result is None:
            row.note, row.failed = why, True
            continue
        r = result[0]
        row.result = f"{'~' if r['estimated'] else ''}{r['s_per_image']:.3f} s/image"
        row.peak = f"{r['peak_mib']:.0f}"
        row.note = (f"{what}; {r['dtype']}, batch {r['batch']}, cond + null in one forward of {2 * r['batch']}"
                    + (f"; ~ = timed over {timed} of {steps} steps and scaled (tiny run)" if r["estimated"] else
                       f"; all {steps} steps timed") + f"; {r['flops_per_s'] / 1e12:.3g} model TFLOP/s"
                    + (f" = {100 * r['share']:.0f}% of peak" if r["share"] else "") + peak_note(plan))
    return rows


def torchrun_rows(runner: Runner, work: Path) -> list[Row]:
    plan = runner.plan
    from guided_diffusion.demo import make_demo_dataset
    data = make_demo_dataset(work / "demo", num_train=8, num_test=2, image_size=32)
    root = work / "runs"
    config = {"data_dir": str(data), "num_classes": 4, "root_log_dir": str(root), "batch_size": 4,
              "max_steps": TORCHRUN_STEPS, "max_epochs": 10, "save_interval": TORCHRUN_STEPS, "log_interval": 1,
              "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
              "attention_resolutions": "16", "num_head_channels": 32, "device": plan.device,
              "precision": "fp32" if plan.tiny else "bf16"}
    config_path = work / "train_tiny.json"
    config_path.write_text(json.dumps(config))
    train = Row("torchrun", f"torchrun --nproc_per_node 1 main.py train, tiny 32 px model, {TORCHRUN_STEPS} steps, "
                            f"{plan.device}")
    started = time.monotonic()
    result, why = runner.run("torchrun main.py train", runner.torchrun("main.py", "train", "-c", str(config_path)),
                             180, marked=False)
    seconds = time.monotonic() - started
    latest = sorted(root.glob("*/checkpoints/latest.pt"))
    if result is None:
        train.note, train.failed = why, True
    elif not latest:
        train.note, train.failed = "exit 0 but no checkpoints/latest.pt was written", True
    else:
        train.result = f"ok: {TORCHRUN_STEPS} steps, {seconds:.1f} s wall"
        train.note = (f"wrote {latest[-1].relative_to(root)}; world size 1: main.py joins no process group (it "
                      f"does for 2+ processes), so the row below checks the collective backend")
    backend = "gloo" if plan.tiny else "cpu:gloo,cuda:nccl"
    collective = Row("torchrun", f"torchrun --nproc_per_node 1, process group \"{backend}\", all_reduce of 4 MiB "
                                 f"{'CPU' if plan.tiny else 'CUDA (NCCL)'}")
    result, why = runner.run("torchrun collective", runner.torchrun(str(REPO / "benchmarks" / "gpu_check.py"),
                                                                    "--child", "collective"), 120)
    if result is None or not result["ok"]:
        collective.note, collective.failed = why or "all_reduce gave a wrong sum", True
    else:
        collective.result = f"ok: {result['all_reduce_ms']:.3f} ms per all_reduce"
        collective.note = (f"backend {result['backend']}, world size {result['world_size']}"
                           + (f", NCCL {result['nccl']}" if result["nccl"] else "")
                           + (f"; {plan.why_tiny}: gloo" if plan.tiny else ""))
    return [train, collective]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cell(c) for c in (r.check, r.setting, r.result, r.peak, r.note)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def caption(plan: Plan, seconds: float) -> str:
    import platform

    import torch
    if plan.tiny:
        where = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {plan.why_tiny}"
    else:
        where = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    return (f"GPU check (benchmarks/gpu_check.sh), {time.strftime('%Y-%m-%d %H:%M')}: {where}; torch "
            f"{torch.__version__}; {seconds:.0f} s of a {plan.budget:.0f} s budget.\n\n")


def find_fixture(given: str | None) -> Path | None:
    if given:
        return Path(given) if Path(given).is_file() else None
    return next((p for p in FIXTURE_PLACES if p.is_file()), None)


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else REPO / "Results" / "gpu_check.md"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, rest = argv[1], argv[2:]
        {"speed": lambda: child_speed(rest), "parity": lambda: child_parity(*rest),
         "collective": child_collective}[kind]()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny config on CPU (automatic without CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too (default: $OUT/gpu_check.md, "
                                                               "else Results/gpu_check.md)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all rows (default: 460 on a GPU, 300 for --tiny); rows left are not run")
    parser.add_argument("--fixture", default=None, help="tiny_sdm.pt (default: shared/fixtures/sdm_parity/ in the "
                                                        "repo, else ../shared/fixtures/sdm_parity/)")
    args = parser.parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    why = "--tiny" if args.tiny else "no CUDA device, so the tiny run"
    sought = args.fixture or " or ".join(str(p) for p in FIXTURE_PLACES)
    plan = Plan(tiny, why, args.budget or (300.0 if tiny else 460.0), find_fixture(args.fixture), sought)
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = Runner(plan, out.with_name(out.name + ".log"))
    started = time.monotonic()
    plan.deadline = started + plan.budget
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        # run order: the cheap rows first, torch.compile's (minutes of compiling) last
        parity = parity_rows(runner)
        eager = train_rows(runner, compiled=False)
        sampling = sample_rows(runner)
        launched = torchrun_rows(runner, Path(work))
        compiled = train_rows(runner, compiled=True)
    rows = parity + eager + compiled + sampling + launched
    text = caption(plan, time.monotonic() - started) + table(rows)
    out.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    print(f"gpu_check: wrote {out} (children's output: {runner.log.name})", file=sys.stderr)
    failed = [f"{r.check} {r.setting}" for r in rows if r.failed]
    if failed:
        print(f"gpu_check: {len(failed)} row(s) without a result: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

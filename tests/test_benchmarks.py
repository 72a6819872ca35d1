"""The speed benchmark runs end to end on CPU at CI size and prints its table (figures are not asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> subprocess.CompletedProcess:
    """A benchmark script's command line, run from the repository root on one CPU thread; its output captured."""
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_speed_benchmark_prints_the_table_and_the_naive_comparison():
    command = [sys.executable, "benchmarks/speed.py", "--batch-size", "1", "--train-steps", "1",
               "--samplers", "dpm++2m:3,ancestral:300", "--max-sample-steps", "2", "--compare-naive", "--repeats", "2"]
    result = run(command)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("| config | device | path | dtype | batch | train img/s") for line in lines)
    rows = [line for line in lines if line.startswith("| tiny | cpu |")]
    assert len(rows) == 5  # ours: train, dpm++2m, ancestral; naive: train, ancestral
    assert any("| dpm++2m | 3 |" in row for row in rows) and any("~" in row for row in rows)  # 300 timed over 2
    assert "sampling dpm++2m 3 steps:" in result.stdout
    assert re.search(r"^training images/s in 2 \(ours, naive\) pairs: \([\d.]+, [\d.]+\), \([\d.]+, [\d.]+\)$",
                     result.stdout, re.M)
    assert re.search(r"^  training: [\d.]+x images/s \(median of 2 pairs; [\d.]+-[\d.]+\)$", result.stdout, re.M)


def test_speed_benchmark_names_the_levers_of_our_path_in_its_rows():
    command = [sys.executable, "benchmarks/speed.py", "--batch-size", "1", "--train-steps", "1",
               "--samplers", "dpm++2m:2", "--max-sample-steps", "2", "--optimizer", "fused", "--channels-last"]
    result = run(command)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny | cpu |")]
    assert len(rows) == 2 and all("| ours, channels-last, fused AdamW |" in row for row in rows)


def test_loader_benchmark_times_uncached_ahead_and_cached_loading_per_size(tmp_path):
    command = [sys.executable, "benchmarks/loader.py", "--data", "", "--large", "64x48", "--sizes", "16,32",
               "--images", "8", "--batch-size", "4", "--ahead-threads", "2"]
    result = run(command)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| generated 64x48 RGB")]
    assert [row[3] for row in rows] == ["16", "32"] and all(len(row) == 8 for row in rows)
    assert "| uncached img/s, 2 threads ahead |" in result.stdout
    bad = run([*command[:2], "--sizes", "x"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("--sizes: expected comma-separated "
                                                                                 "integers, got 'x'")


def test_quality_guard_compares_fast_samplers_in_fp32_and_bf16_with_the_references(demo_dir, trained_run):
    command = [sys.executable, "benchmarks/quality_guard.py", "--model", str(trained_run), "--data-dir",
               str(demo_dir), "--num-images", "2", "--batch-size", "2", "--solver-steps", "3", "--bf16",
               "--segmenter-steps", "0", "--reference-steps", "25"]  # ISDM's schedule shortened from 300: quick
    result = run(command)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in result.stdout.splitlines()
            if line.startswith("| ") and " | " in line}
    assert {"ancestral", "ancestral, other step noise", "dpm++2m", "dpm++2m, bf16", "ddim"} <= set(rows)
    assert rows["dpm++2m, bf16"].split(" | ")[1] == "3"
    assert "| sampler | steps | dist ancestral25 | dist ode |" in result.stdout
    assert "| ancestral | 25 | 0.00 |" in result.stdout  # the reference, against itself
    assert rows["ancestral, other step noise"].split(" | ")[1] == "25"


def test_quality_guard_refuses_an_unknown_solver_in_one_line():
    command = [sys.executable, "benchmarks/quality_guard.py", "--model", "unused", "--data-dir", "unused",
               "--solvers", "dpm++2m,euler"]
    result = run(command)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("quality_guard.py: error: --solvers: unknown sampler(s) euler; "
                                                      "expected some of ancestral, ddim, dpm++2m")
    result = run([*command[:-2], "--reference-steps", "20"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("quality_guard.py: error: --reference-steps 20: key "
                                                             "'diffusion_steps' must be at least 21 with the linear")


def test_mask_generator_check_refuses_a_guidance_scale_below_one_before_training():
    for option in ("--guidance", "--plain-guidance"):
        result = run([sys.executable, "benchmarks/mask_generator_check.py", option, "0.5"])
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (f"mask_generator_check.py: error: {option} is a guidance "
                                                          "scale and must be >= 1 (1 = none), got 0.5")


def test_mask_generator_check_compares_generated_and_held_out_masks_with_the_training_masks(tmp_path):
    from guided_diffusion.demo import make_demo_dataset
    data = make_demo_dataset(tmp_path / "demo", num_train=12, num_test=2, image_size=32)
    command = [sys.executable, "benchmarks/mask_generator_check.py", "--data", str(data), "--size", "16",
               "--steps", "2", "--batch-size", "4", "--samples", "4", "--sample-steps", "3", "--plain-guidance",
               "1.5", "--out", str(tmp_path / "out")]
    result = run(command)
    assert result.returncode == 0, result.stderr
    assert "| against the training masks | generated | held-out real |" in result.stdout
    assert "sampling 3 ancestral steps (guidance 1.5):" in result.stdout
    assert "near-copies (IoU > 0.9 with a training mask)" in result.stdout
    assert re.search(r"^asked for \w+ \(guidance 2\): [\d.]+% of 4 masks hold it", result.stdout, re.M)
    for name in ("generated_vs_train.json", "held_out_vs_train.json", "generated_masks.png"):
        assert (tmp_path / "out" / name).is_file(), name

    # --trained samples that generator again without training; one of another size is refused in one line
    trained = tmp_path / "out" / "runs" / "masks_001"
    again = run(command + ["--trained", str(trained)])
    assert again.returncode == 0, again.stderr
    assert f"reused from {trained}" in again.stdout and not (tmp_path / "out" / "runs" / "masks_002").exists()
    other = [*command[:command.index("--size") + 1], "32", *command[command.index("--size") + 2:]]
    refused = run(other + ["--trained", str(trained)])
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == f"--trained {trained}: its image_size is 16, this call's is 32"

    # --resume trains that generator on to --steps in a new run; a run of as many steps or more is refused
    steps_at = command.index("--steps") + 1
    longer = [*command[:steps_at], "3", *command[steps_at + 1:]]
    resumed = run(longer + ["--resume", str(trained)])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "out" / "runs" / "masks_002" / "summary.json").read_text())["steps"] == 3
    refused = run(command + ["--resume", str(trained)])
    assert refused.stderr.strip().splitlines()[-1] == (f"--resume {trained}: it trained 2 steps, not fewer than "
                                                       "--steps 2")


def test_mask_generator_check_trains_on_crops_with_class_weights_and_samples_at_the_full_size(tmp_path):
    from guided_diffusion.demo import make_demo_dataset
    data = make_demo_dataset(tmp_path / "demo", num_train=12, num_test=2, image_size=32)
    command = [sys.executable, "benchmarks/mask_generator_check.py", "--data", str(data), "--size", "32",
               "--crop-size", "16", "--class-weight-power", "0.5", "--steps", "2", "--batch-size", "4",
               "--samples", "2", "--sample-steps", "2", "--out", str(tmp_path / "out")]
    result = run(command)
    assert result.returncode == 0, result.stderr
    assert "mask generator: 32 px (trained on 16 px crops), class_weight_power 0.5, v prediction" in result.stdout
    run_config = json.loads((tmp_path / "out" / "runs" / "masks_001" / "config.json").read_text())
    assert (run_config["image_size"], run_config["crop_size"], run_config["class_weight_power"]) == (32, 16, 0.5)
    import numpy as np
    assert np.load(tmp_path / "out" / "masks.npz")["generated"].shape == (2, 32, 32)

    # a run trained on full frames is not the one asked for
    uncropped = [*command[:command.index("--crop-size")], *command[command.index("--crop-size") + 2:]]
    refused = run(uncropped + ["--trained", str(tmp_path / "out" / "runs" / "masks_001")])
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].endswith("its crop_size is 16, this call's is 0")


def test_mask_generator_speed_times_the_1x1_condition_against_the_spread_one():
    result = run([sys.executable, "benchmarks/mask_generator_speed.py", "--size", "16", "--classes", "3",
                  "--batch-size", "2", "--sample-batch", "1", "--repeats", "1"])
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1x1") or line.startswith("| spread")]
    assert [row.split(" | ")[0] for row in rows] == ["| 1x1 presence vector", "| spread over every pixel"]
    assert re.search(r"^the 1x1 path: [\d.]+x the training steps/s, [\d.]+x the sampling forwards/s$",
                     result.stdout, re.M)
    bad = run([sys.executable, "benchmarks/mask_generator_speed.py", "--size", "0"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("--size must be >= 1, got 0")


def test_mask_generator_check_refuses_a_bad_generator_option_in_one_line(tmp_path):
    from guided_diffusion.demo import make_demo_dataset
    data = make_demo_dataset(tmp_path / "demo", num_train=4, num_test=1, image_size=32)
    bad = run([sys.executable, "benchmarks/mask_generator_check.py", "--data", str(data), "--size", "16",
               "--class-weight-power", "2", "--out", str(tmp_path / "out")])
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("mask_generator_check: key 'class_weight_power' must be in [0, 1] "
                                                   "(0 = off), got 2.0")
    assert not (tmp_path / "out" / "runs").exists()


def test_colour_cast_benchmark_trains_one_sdm_per_offset_noise_and_prints_their_colour_rows(demo_dir, tmp_path):
    command = [sys.executable, "benchmarks/colour_cast.py", "--data-dir", str(demo_dir), "--train-steps", "2",
               "--num-samples", "4", "--sample-steps", "2", "--offset-noise", "0,0.1", "--work-dir", str(tmp_path)]
    result = run(command)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0] for row in rows] == ["| images", "| real train images", "| real: even vs odd images (the FD's "
                                        "noise floor)", "| offset_noise 0", "| offset_noise 0.1"]
    assert all(len(row[1].split()) == 3 for row in rows[1:])  # mean R G B
    assert all(row[4] != "0.0" for row in rows[3:])  # the samples are measured, not the real images beside them
    assert [len(list((tmp_path / name / "sample_001" / "samples").iterdir())) for name in ("offset_0", "offset_0.1")] \
        == [4, 4]
    bad = run([*command[:2], "--offset-noise", "x"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "--offset-noise: expected comma-separated numbers, got 'x'")


def test_the_isdm_reference_path_samples_what_our_default_path_samples():
    """speed.py's naive path (ISDM's p_sample loop, two forwards, its attention) computes the same images as the
    product's guided ancestral sampler from the same noise draws, so the benchmark compares two ways of doing
    one computation."""
    import torch
    from benchmarks.isdm_path import IsdmSampler, isdm_attention
    from conftest import TINY_MODEL
    from guided_diffusion.config import config_from_dict
    from guided_diffusion.diffusion import GaussianDiffusion
    from guided_diffusion.guidance import conditional_denoiser
    from guided_diffusion.samplers import run_sampler
    from guided_diffusion.unet import SDMUNet

    torch.manual_seed(0)
    config, _ = config_from_dict("train", {"data_dir": "unused", "num_classes": 3, **TINY_MODEL})
    model = SDMUNet(config.unet_spec()).eval()
    for p in model.parameters():  # zero-initialised output layers would make both paths trivially agree
        p.data.add_(0.02 * torch.randn_like(p))
    labels = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 32, 32)), 3).permute(0, 3, 1, 2).float()
    x_T = torch.randn(2, 3, 32, 32)
    diffusion = GaussianDiffusion.create(300, "linear", "6", rescale_timesteps=True)  # 6 of ISDM's 300 steps
    with torch.no_grad():
        torch.manual_seed(1)  # both paths draw the step noise from the global generator, in the same order
        ours = run_sampler("ancestral", diffusion, conditional_denoiser(model, labels, 1.5), x_T.clone(),
                           lambda: torch.randn(x_T.shape))
        torch.manual_seed(1)
        reference = IsdmSampler(diffusion).sample(model, x_T.clone(), labels, 1.5)
        q, k, v = torch.randn(3, 2, 4, 64, 16).unbind(0)
        attention = isdm_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (ours - reference).abs().max() < 1e-4 and (ours - x_T).abs().max() > 0.1
    assert torch.allclose(*attention, atol=1e-5)


def test_speed_benchmark_splits_each_sampling_step_into_its_parts():
    command = [sys.executable, "benchmarks/speed.py", "--batch-size", "1", "--train-steps", "0",
               "--samplers", "ancestral:300", "--max-sample-steps", "3", "--compare-naive"]
    result = run(command)
    assert result.returncode == 0, result.stderr
    ours = re.search(r"^  ours fp32 ancestral 300: forward ([\d.]+), guidance combine ([\d.]+), noise ([\d.]+), "
                     r"step arithmetic (-?[\d.]+); total ([\d.]+)$", result.stdout, re.M)
    naive = re.search(r"^  naive fp32 ancestral 300: forward ([\d.]+), the rest \(ISDM's p_sample\) (-?[\d.]+); "
                      r"total ([\d.]+)$", result.stdout, re.M)
    assert ours and naive, result.stdout
    assert float(ours[1]) > 0 and float(naive[1]) > 0
    assert re.search(r"^  sampling ancestral 300 steps: [\d.]+x less time per image than naive ancestral 300$",
                     result.stdout, re.M)


def test_watch_overhead_benchmark_times_runs_with_and_without_tensorboard_and_previews():
    command = [sys.executable, "benchmarks/watch_overhead.py", "--steps", "4", "--pairs", "2", "--batch-size", "2",
               "--images", "6", "--log-interval", "1", "--preview-interval", "2"]
    result = run(command)
    assert result.returncode == 0, result.stderr
    assert "preview_interval 2 = 2 steps (2 preview(s) of 4 masks, ancestral 50 steps)" in result.stdout
    rows = [line.split(" | ") for line in result.stdout.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [row[1] for row in rows] == ["off first", "watched first"]
    assert all(row[5] == "2" for row in rows)  # two previews in each watched run, read from its TensorBoard events
    assert re.search(r"^median overhead of the watched runs: [+-][\d.]+% over 2 pairs \(range [+-][\d.]+% to "
                     r"[+-][\d.]+%\); previews' share of their time: median [\d.]+%$", result.stdout, re.M)
    bad = run([*command[:2], "--preview-interval", "often"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "--preview-interval: expected \"auto\" or a number of steps, got 'often'")

"""Sampling: ISDM's output layout, per-image seeds, checkpoint/config agreement, the rescaled schedule."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.config import config_from_dict
from guided_diffusion.errors import CheckpointError, ConfigError
from guided_diffusion.run_folder import SAMPLE_FOLDERS, hold_run, run_is_held
from guided_diffusion.sampling import sample as sample_module
from guided_diffusion.sampling.sample import run_sampling, sampling_diffusion


def sample(demo_dir: Path, model_path: Path, root: Path, log=lambda *_: None, **changes) -> Path:
    values = {"data_dir": str(demo_dir), "model_path": str(model_path), "root_log_dir": str(root),
              "num_samples": 3, "batch_size": 3, "timestep_respacing": "5", **changes}
    config, _ = config_from_dict("sample", values)
    return Path(run_sampling(config, given=set(values), log=log)["run_dir"])


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def bar_counts(stderr: str, desc: str = "sample") -> list[str]:
    """Every `n/total` the `desc` progress bar printed, as printed."""
    return re.findall(rf"{desc}: +\d+%\|[^|]*\| *(\S+/\S+) \[", stderr)


def test_sample_writes_isdm_layout_with_matching_stems(demo_dir, trained_run, tmp_path):
    run_dir = sample(demo_dir, trained_run, tmp_path)
    names = {sub: sorted(pngs(run_dir / sub)) for sub in ("images", "labels", "colored_labels", "samples")}
    assert len(names["samples"]) == 3
    assert names["images"] == names["labels"] == names["colored_labels"] == names["samples"]
    assert (run_dir / "grid.png").is_file() and (run_dir / "legend.png").is_file()
    assert json.loads((run_dir / "config.json").read_text())["num_classes"] == 4  # taken from the checkpoint
    sample_image = pngs(run_dir / "samples")[names["samples"][0]]
    assert sample_image.shape == (32, 32, 3) and sample_image.dtype == np.uint8
    label = pngs(run_dir / "labels")[names["labels"][0]]
    assert label.shape == (32, 32) and label.max() < 4


def test_image_i_is_the_same_whatever_the_batch_size(demo_dir, trained_run, tmp_path):
    one_by_one = pngs(sample(demo_dir, trained_run, tmp_path / "a", batch_size=1, s=1.5) / "samples")
    all_at_once = pngs(sample(demo_dir, trained_run, tmp_path / "b", batch_size=3, s=1.5) / "samples")
    assert one_by_one.keys() == all_at_once.keys()
    for name in one_by_one:
        difference = np.abs(one_by_one[name].astype(int) - all_at_once[name].astype(int))
        assert difference.max() <= 1, name  # float rounding may flip a uint8 level, nothing more


def test_the_progress_bar_counts_whole_steps_of_a_batch(demo_dir, trained_run, tmp_path, capsys):
    # 5 images in batches of 2 with 5 steps: 3 batches x 5 steps = 15 steps, and the images done beside them.
    sample(demo_dir, trained_run, tmp_path, num_samples=5, batch_size=2)
    stderr = capsys.readouterr().err
    counts = bar_counts(stderr)
    assert counts and all(re.fullmatch(r"\d+/15", count) for count in counts), counts
    assert counts[-1] == "15/15" and "images=5/5" in stderr


def test_a_model_trained_with_void_pixels_samples_them_as_void_without_being_told(tmp_path):
    """ignore_index 255: training accepts the void pixels (refusing them without the key, with the fix in one
    line), and sampling takes the value from the checkpoint: written labels keep 255, painted white."""
    from conftest import make_scene_dataset, tiny_train_config
    from guided_diffusion.errors import DatasetError
    from guided_diffusion.train import Trainer
    data = make_scene_dataset(tmp_path / "scenes", num_train=4, num_test=2)
    values = tiny_train_config(data, tmp_path / "runs", num_classes=5, max_steps=2, max_epochs=1)
    with pytest.raises(DatasetError, match=r"values outside 0..4 .*; where 255 marks void pixels set ignore_index "
                                           r"255 \(masks of 0 and 255 alone: dataset_mode binary\)"):
        Trainer(config_from_dict("train", values)[0], "train", log=lambda *_: None)
    config, _ = config_from_dict("train", {**values, "ignore_index": 255})
    run = Trainer(config, "train", log=lambda *_: None).run().run_dir
    run_dir = sample(data, run, tmp_path / "samples", mask_split="all")
    assert json.loads((run_dir / "config.json").read_text())["ignore_index"] == 255
    labels, colored = pngs(run_dir / "labels"), pngs(run_dir / "colored_labels")
    for name, label in labels.items():
        assert (label == 255).any() and label[label != 255].max() < 5
        assert (colored[name][label == 255] == 255).all()


def test_different_seeds_give_different_images(demo_dir, trained_run, tmp_path):
    a = pngs(sample(demo_dir, trained_run, tmp_path / "a", seed=1) / "samples")
    b = pngs(sample(demo_dir, trained_run, tmp_path / "b", seed=2) / "samples")
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_num_classes_different_from_the_checkpoint_is_a_config_error(demo_dir, trained_run, tmp_path):
    with pytest.raises(ConfigError, match="key 'num_classes' is 5 but the checkpoint was trained with 4"):
        sample(demo_dir, trained_run, tmp_path, num_classes=5)


def test_model_keys_matching_the_checkpoint_in_another_form_are_accepted(demo_dir, trained_run, tmp_path):
    run_dir = sample(demo_dir, trained_run, tmp_path, channel_mult=[1, 2, 2], num_classes=4, num_samples=1)
    assert len(pngs(run_dir / "samples")) == 1


def test_model_path_without_a_checkpoint_is_a_clear_error(demo_dir, tmp_path):
    with pytest.raises(CheckpointError, match="model_path .*no checkpoint there"):
        sample(demo_dir, tmp_path, tmp_path)


def test_masks_cycle_when_more_samples_than_masks_are_asked(demo_dir, trained_run, tmp_path):
    run_dir = sample(demo_dir, trained_run, tmp_path, num_samples=5, batch_size=5, mask_split="val")
    stems = sorted(p.stem for p in (run_dir / "samples").glob("*.png"))
    sources = [s.split("_", 1)[1] for s in stems]
    assert len(stems) == 5 and len(set(sources)) == 2  # the 2 held-out masks of the 12-image demo, cycled


def test_ddim_on_a_respaced_process(demo_dir, trained_run, tmp_path):
    run_dir = sample(demo_dir, trained_run, tmp_path, use_ddim=True, timestep_respacing="ddim5")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sampler"] == "ddim" and summary["steps"] == 5


def test_the_rescaled_schedule_samples_finite_images(demo_dir, trained_run, tmp_path):
    run_dir = sample(demo_dir, trained_run, tmp_path, timestep_respacing="", diffusion_steps=21, num_samples=1)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 21
    assert len(pngs(run_dir / "samples")) == 1


def test_too_few_rescaled_linear_steps_are_refused():
    with pytest.raises(ConfigError, match="key 'diffusion_steps' must be at least 21 with the linear schedule"):
        config_from_dict("sample", {"data_dir": "d", "model_path": "m", "diffusion_steps": 10})


def test_default_sampling_is_the_rescaled_300_step_schedule():
    config, _ = config_from_dict("sample", {"data_dir": "d", "model_path": "m"})
    diffusion = sampling_diffusion(config)
    assert diffusion.num_timesteps == 300
    assert diffusion.model_timesteps(torch.tensor([299])).item() == pytest.approx(299 * 1000 / 300)


def test_a_guidance_interval_covering_every_step_writes_the_same_images(demo_dir, trained_run, tmp_path):
    everywhere = sample(demo_dir, trained_run, tmp_path / "a", s=1.5)
    covering = sample(demo_dir, trained_run, tmp_path / "b", s=1.5, guidance_interval=[0.0, 1.0])
    before, after = pngs(everywhere / "samples"), pngs(covering / "samples")
    assert len(before) == 3 and before.keys() == after.keys()
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert json.loads((covering / "summary.json").read_text())["guidance_interval"] == [0.0, 1.0]
    assert "guidance_interval" not in json.loads((everywhere / "summary.json").read_text())


@pytest.mark.parametrize("mode", [{"mode": "noise"}, {"mode": "variation", "strength": 0.6}], ids=lambda m: m["mode"])
def test_every_mode_guides_only_the_steps_inside_the_interval(demo_dir, trained_run, tmp_path, monkeypatch, mode):
    from guided_diffusion.sampling import sample as sample_module
    calls, real = [], sample_module.conditional_denoiser

    def recording(model, one_hot, scale, **options):
        def counted(x, t, y):
            calls.append((x.shape[0], float(t[0]) / options["time_range"], one_hot.shape[0]))
            return model(x, t, y)
        return real(counted, one_hot, scale, **options)

    monkeypatch.setattr(sample_module, "conditional_denoiser", recording)
    sample(demo_dir, trained_run, tmp_path, s=1.5, guidance_interval=[0.5, 1.0], timestep_respacing="8", **mode)
    assert calls and all(rows == (2 * batch if 0.5 <= fraction <= 1.0 else batch) for rows, fraction, batch in calls)
    assert {rows == 2 * batch for rows, _, batch in calls} == {True, False}  # both kinds of step ran


def test_guidance_of_a_grey_model_scales_its_eps_channel_and_leaves_its_learned_variance(tmp_path):
    """A 1-channel model outputs eps and the variance interpolation v: s extrapolates eps only (guiding v would
    push the ancestral sampler's variance outside the range the model learned)."""
    from guided_diffusion.diffusion import GaussianDiffusion
    from guided_diffusion.sampling.sample import sampling_denoiser

    class Fixed(torch.nn.Module):  # eps 1 and v 0.5 for a real mask, eps 0 and v -0.5 for the null label
        def forward(self, x, t, one_hot):
            real = one_hot.flatten(1).abs().sum(1).gt(0).float().view(-1, 1, 1, 1)
            return torch.cat([real.expand_as(x), (real - 0.5).expand_as(x)], dim=1)

    config = config_from_dict("sample", {"data_dir": str(tmp_path), "num_classes": 2, "image_size": 8,
                                         "image_channels": 1, "s": 3.0, "model_path": "x",
                                         "attention_resolutions": "4"})[0]
    labels = torch.zeros(2, 2, 8, 8)
    labels[:, 1] = 1.0
    denoise = sampling_denoiser(config, Fixed(), labels, GaussianDiffusion(np.linspace(1e-4, 0.02, 10)))
    out = denoise(torch.zeros(2, 1, 8, 8), torch.tensor([5, 5]))
    assert out.shape == (2, 2, 8, 8)
    assert torch.all(out[:, 0] == 3.0)  # 0 + 3 * (1 - 0)
    assert torch.all(out[:, 1] == 0.5)  # the conditional v, unguided


class Stop(Exception):
    """A session's end or a Slurm time limit, in the middle of a sample run."""


def batches_sampled(monkeypatch, stop_at: int | None = None) -> list[list[int]]:
    """The image ids of every batch sampled from now on; with `stop_at`, Stop is raised instead of sampling that
    batch (counted from 1)."""
    real, calls = sample_module.sample_batch, []

    def counted(job, ids, progress):
        calls.append(ids)
        if stop_at is not None and len(calls) >= stop_at:
            raise Stop
        return real(job, ids, progress)

    monkeypatch.setattr(sample_module, "sample_batch", counted)
    return calls


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for folder in SAMPLE_FOLDERS for p in sorted((run_dir / folder).glob("*.png"))}


def stopped_run(demo_dir, trained_run, root, monkeypatch) -> Path:
    """5 images in batches of 2 with auto_resume, stopped as the third batch starts: images 0-3 are written."""
    with monkeypatch.context() as patch:
        batches_sampled(patch, stop_at=3)
        with pytest.raises(Stop):
            sample(demo_dir, trained_run, root, num_samples=5, batch_size=2, auto_resume=True)
    return root / "sample_001"


def test_auto_resume_continues_a_stopped_run_in_its_folder_and_ends_with_the_files_of_an_unbroken_run(
        demo_dir, trained_run, tmp_path, monkeypatch):
    unbroken = sample(demo_dir, trained_run, tmp_path / "unbroken", num_samples=5, batch_size=2)
    stopped = stopped_run(demo_dir, trained_run, tmp_path / "stopped", monkeypatch)
    assert len(pngs(stopped / "samples")) == 4 and not (stopped / "summary.json").exists()

    sampled, log = batches_sampled(monkeypatch), []
    resumed = sample(demo_dir, trained_run, tmp_path / "stopped", log=log.append, num_samples=5, batch_size=2,
                     auto_resume=True)
    assert resumed == stopped and sampled == [[4]]  # only the batch the stop cut off is sampled
    assert files(resumed) == files(unbroken)
    assert np.array_equal(pngs(resumed)["grid.png"], pngs(unbroken)["grid.png"])  # its first rows read back
    assert json.loads((resumed / "summary.json").read_text())["kept_from_stopped_run"] == 4
    assert any("4 kept from the stopped run, 1 to go" in line for line in log)


def test_an_image_whose_files_a_stop_cut_short_is_sampled_again(demo_dir, trained_run, tmp_path, monkeypatch):
    unbroken = sample(demo_dir, trained_run, tmp_path / "unbroken", num_samples=5, batch_size=2)
    stopped = stopped_run(demo_dir, trained_run, tmp_path / "stopped", monkeypatch)
    record = stopped / "sampled.txt"
    record.write_text(record.read_text()[:-2])  # image 3's line was being written: "3" without its newline
    cut_short = next((stopped / "samples").glob("00003_*.png"))
    cut_short.write_bytes(cut_short.read_bytes()[:20])

    sampled = batches_sampled(monkeypatch)
    resumed = sample(demo_dir, trained_run, tmp_path / "stopped", num_samples=5, batch_size=2, auto_resume=True)
    assert sampled == [[2, 3], [4]]  # image 2 is kept as written, image 3 made again
    assert files(resumed) == files(unbroken)


@pytest.mark.parametrize("change, reason", [({"s": 2.0}, "its config.json differs in s"),
                                            ({"finish": True}, "it is finished (summary.json)")])
def test_auto_resume_starts_a_new_folder_beside_a_run_it_must_not_continue_and_says_why(
        demo_dir, trained_run, tmp_path, monkeypatch, change, reason):
    stopped = stopped_run(demo_dir, trained_run, tmp_path, monkeypatch)
    refused = stopped
    if change.pop("finish", False):
        refused = sample(demo_dir, trained_run, tmp_path, num_samples=5, batch_size=2, auto_resume=True)
    before, log = files(refused), []
    run_dir = sample(demo_dir, trained_run, tmp_path, log=log.append, num_samples=5, batch_size=2,
                     auto_resume=True, **change)
    assert run_dir not in (stopped, refused) and len(pngs(run_dir / "samples")) == 5
    assert any(f"not continuing {refused}: {reason}" in line for line in log), log
    assert files(refused) == before  # the run not continued is left as it was


def test_auto_resume_leaves_a_run_another_process_samples_into_and_continues_the_stopped_run_before_it(
        demo_dir, trained_run, tmp_path, monkeypatch):
    """Two Slurm jobs of one config: the requeued one continues its own stopped run, not the run beside it that
    the other job is sampling into (that job holds its run.lock)."""
    stopped = stopped_run(demo_dir, trained_run, tmp_path, monkeypatch)
    under_way = tmp_path / "sample_002"
    shutil.copytree(stopped, under_way)  # the other job's run, as far along
    before = files(under_way)
    sampled, log = batches_sampled(monkeypatch), []
    with hold_run(under_way):
        run_dir = sample(demo_dir, trained_run, tmp_path, log=log.append, num_samples=5, batch_size=2,
                         auto_resume=True)
    assert run_dir == stopped and sampled == [[4]]
    assert any(f"not continuing {under_way}: another process is sampling into it" in line for line in log), log
    assert files(under_way) == before and not (under_way / "summary.json").exists()


def test_auto_resume_starts_a_new_folder_when_the_only_stopped_run_is_being_sampled_into(
        demo_dir, trained_run, tmp_path, monkeypatch):
    stopped = stopped_run(demo_dir, trained_run, tmp_path, monkeypatch)
    before = files(stopped)
    with hold_run(stopped):
        run_dir = sample(demo_dir, trained_run, tmp_path, num_samples=5, batch_size=2, auto_resume=True)
    assert run_dir.name == "sample_002" and len(pngs(run_dir / "samples")) == 5
    assert files(stopped) == before
    assert not run_is_held(run_dir)  # let go when the run ended


def test_without_auto_resume_a_stopped_run_is_left_alone(demo_dir, trained_run, tmp_path, monkeypatch):
    stopped = stopped_run(demo_dir, trained_run, tmp_path, monkeypatch)
    before = files(stopped)
    run_dir = sample(demo_dir, trained_run, tmp_path, num_samples=5, batch_size=2)
    assert run_dir.name == "sample_002" and files(stopped) == before


def test_a_stop_signal_ends_sampling_after_the_batch_under_way_and_auto_resume_finishes_it(
        demo_dir, trained_run, tmp_path, monkeypatch):
    """SIGUSR1 is what `sbatch --signal=USR1@300` sends before the time limit (SIGTERM: a preemption)."""
    import os
    import signal

    unbroken = sample(demo_dir, trained_run, tmp_path / "unbroken", num_samples=5, batch_size=2)
    real_batch = sample_module.sample_batch

    def signalled_during_the_first_batch(job, ids, progress):
        if ids == [0, 1]:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler records it; the batch goes on
        return real_batch(job, ids, progress)
    values = {"data_dir": str(demo_dir), "model_path": str(trained_run), "root_log_dir": str(tmp_path / "stopped"),
              "num_samples": 5, "batch_size": 2, "timestep_respacing": "5", "auto_resume": True}
    config, _ = config_from_dict("sample", values)
    with monkeypatch.context() as patch:
        patch.setattr(sample_module, "sample_batch", signalled_during_the_first_batch)
        result = run_sampling(config, given=set(values), log=lambda *_: None)
    stopped = Path(result["run_dir"])
    assert result["stop_signal"] == "SIGUSR1" and not (stopped / "summary.json").exists()
    assert (stopped / "sampled.txt").read_text() == "0\n1\n"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is gone with the run

    assert sample(demo_dir, trained_run, tmp_path / "stopped", num_samples=5, batch_size=2, auto_resume=True) == stopped
    assert files(stopped) == files(unbroken)


def test_main_sample_asks_sbatch_to_requeue_when_a_stop_signal_ended_the_run(monkeypatch):
    import main
    from guided_diffusion import distributed

    ignored = []
    monkeypatch.setattr(sample_module, "run_sampling", lambda *_, **__: {"stop_signal": "SIGTERM", "run_dir": "x"})
    monkeypatch.setattr(distributed, "ignore_stop_signals", lambda: ignored.append(True))
    loaded = SimpleNamespace(config=SimpleNamespace(hardness_args=None), given=set())
    assert main.sample(loaded, "sample", "config.json") == distributed.REQUEUE_EXIT_STATUS == 75
    assert ignored  # the exit itself must not be cut short by a second signal


def test_auto_resume_that_is_not_true_or_false_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="key 'auto_resume' must be true/false, got \"yes\""):
        config_from_dict("sample", {"data_dir": str(tmp_path), "model_path": "x", "auto_resume": "yes"})

"""Configs: ISDM key names, strict typing, one error line naming the file and the key."""

from __future__ import annotations

import pytest

from conftest import TINY_MODEL, write_config
from guided_diffusion.config import config_from_dict, config_to_dict, load_config, parse_override
from guided_diffusion.errors import ConfigError

BASE = {"data_dir": "datasets/demo", "num_classes": 4, **TINY_MODEL}
SAMPLE_BASE = {**BASE, "model_path": "m.pt"}


def error_for(action: str, values: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(action, values, "configs/x.json")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("action, changes, message", [
    ("train", {"ignore_index": 2}, "key 'ignore_index' is 2, a class id of the 4 classes; void pixels need a value "
                                   "of their own (e.g. 255)"),
    ("train", {"ignore_index": 300}, "key 'ignore_index' must be a mask value 0..255 or null, got 300"),
    ("finetune", {"ignore_index": 255, "dataset_mode": "binary", "num_classes": 2, "resume_checkpoint": "x"},
     "key 'ignore_index' needs dataset_mode multi-class (binary masks are 0 and 255 alone)"),
    ("masks", {"ignore_index": 255}, "key 'ignore_index' is 255, but the mask generator has no void class"),
])
def test_a_void_value_that_is_a_class_out_of_range_binary_or_for_the_mask_generator_is_refused(action, changes,
                                                                                             message):
    assert message in error_for(action, {**BASE, **changes})


def test_unknown_key_names_the_file_and_suggests_the_close_key():
    message = error_for("train", {**BASE, "num_clases": 3})
    assert message == "configs/x.json: unknown key 'num_clases' for train (did you mean 'num_classes'?)"


def test_wrong_type_names_the_key_and_the_expected_type():
    message = error_for("train", {**BASE, "batch_size": "8"})
    assert "key 'batch_size' must be an integer" in message and '"8"' in message


def test_booleans_are_not_numbers():
    assert "key 'lr'" in error_for("train", {**BASE, "lr": True})


def test_guidance_scale_below_one_is_refused():
    message = error_for("sample", {**BASE, "model_path": "m.pt", "s": 0.5})
    assert "key 's'" in message and ">= 1" in message


def test_image_size_must_fit_the_unet_downsampling():
    message = error_for("train", {**BASE, "image_size": 34})
    assert "key 'image_size'" in message and "multiple of 4" in message


def test_attention_resolution_must_exist_in_the_unet():
    message = error_for("train", {**BASE, "attention_resolutions": "12"})
    assert "key 'attention_resolutions'" in message


def test_num_channels_must_suit_group_norm():
    assert "key 'num_channels'" in error_for("train", {**BASE, "num_channels": 48})


def test_binary_datasets_have_two_classes():
    message = error_for("train", {**BASE, "dataset_mode": "binary", "num_classes": 3})
    assert "key 'num_classes'" in message and "binary" in message


def test_isdm_dataset_mode_names_are_aliases():
    config, _ = config_from_dict("train", {**BASE, "dataset_mode": "lemon-binary", "num_classes": 2})
    assert config.dataset_mode == "binary"
    config, _ = config_from_dict("train", {**BASE, "dataset_mode": "lemon-multi-class"})
    assert config.dataset_mode == "multi-class"


def test_unknown_dataset_mode_is_a_config_error():
    assert "dataset_mode" in error_for("train", {**BASE, "dataset_mode": "rgb"})


def test_isdm_weights_decay_spelling_is_accepted():
    config, _ = config_from_dict("train", {**BASE, "weights_decay": 0.01})
    assert config.weight_decay == 0.01


def test_legacy_keys_without_effect_are_reported_not_refused():
    _, notes = config_from_dict("train", {**BASE, "fp16_scale_growth": 0.001, "is_train": True}, "configs/x.json")
    assert notes == ["configs/x.json: ignored for train: fp16_scale_growth (mixed precision uses bf16 autocast, which "
                     "needs no loss scaling); is_train (the action on the command line decides)"]


def test_keys_of_train_in_a_sample_config_are_reported_once_in_one_line():
    values = {**BASE, "model_path": "m.pt", "lr": 1e-4, "max_steps": 5, "drop_rate": 0.2}
    config, notes = config_from_dict("sample", values, "configs/x.json")
    assert notes == ["configs/x.json: ignored for sample: lr, max_steps, drop_rate (keys of train/finetune)"]
    assert not hasattr(config, "lr") and config.model_path == "m.pt"


def test_keys_of_sample_in_a_train_config_are_reported_with_the_legacy_keys_in_the_same_line():
    _, notes = config_from_dict("train", {**BASE, "s": 1.5, "num_samples": 8, "results_path": ""}, "configs/x.json")
    assert notes == ["configs/x.json: ignored for train: s, num_samples (keys of sample); results_path (outputs go "
                     "to a fresh run folder under root_log_dir)"]


def test_a_config_with_only_its_own_keys_has_no_notes():
    assert config_from_dict("finetune", {**BASE, "resume_checkpoint": "x", "drop_rate": 0.1})[1] == []


def test_an_ignored_key_is_named_as_the_file_spells_it():
    _, notes = config_from_dict("sample", {**SAMPLE_BASE, "weights_decay": 1e-5}, "configs/x.json")
    assert notes == ["configs/x.json: ignored for sample: weights_decay (key of train/finetune)"]


def test_export_and_import_refuse_keys_of_the_isdm_actions_and_say_whose_they_are():
    message = error_for("export", {"source": "runs/sample_001", "lr": 1e-4})
    assert message == "configs/x.json: unknown key 'lr' for export (a key of train/finetune/masks)"
    message = error_for("sample", {**SAMPLE_BASE, "contact_sheet": 4})
    assert message == "configs/x.json: unknown key 'contact_sheet' for sample (a key of export)"


def test_a_mistyped_key_is_still_refused_when_another_action_has_a_close_key():
    assert "unknown key 'max_step' for sample (did you mean" in error_for("sample", {**SAMPLE_BASE, "max_step": 2})


def test_comma_separated_and_list_forms_build_the_same_model():
    a, _ = config_from_dict("train", {**BASE, "channel_mult": "1,2,2", "attention_resolutions": "16,8"})
    b, _ = config_from_dict("train", {**BASE, "channel_mult": [1, 2, 2], "attention_resolutions": [16, 8]})
    assert a.unet_spec() == b.unet_spec()


def test_finetune_needs_a_checkpoint_and_defaults_to_null_label_dropout():
    assert "key 'resume_checkpoint'" in error_for("finetune", BASE)
    config, _ = config_from_dict("finetune", {**BASE, "resume_checkpoint": "Results"})
    assert config.drop_rate == 0.2


def test_sample_defaults_to_isdm_300_step_guided_sampling():
    config, _ = config_from_dict("sample", {"data_dir": "d", "model_path": "m.pt"})
    assert (config.diffusion_steps, config.s, config.use_ddim, config.rescale_timesteps) == (300, 1.5, False, True)


def test_drop_rate_out_of_range_is_refused():
    assert "key 'drop_rate'" in error_for("finetune", {**BASE, "resume_checkpoint": "x", "drop_rate": 1.0})


def test_load_config_reports_invalid_json_with_its_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data_dir": "d",,}')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(line 1, column"):
        load_config(path, "train")


def test_load_config_reports_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json", "train")


def test_ignored_keys_are_not_recorded_as_given(tmp_path):
    path = write_config(tmp_path / "c.json", {**SAMPLE_BASE, "lr": 1e-4, "is_train": False})
    loaded = load_config(path, "sample", ["max_steps=3"])
    assert not {"lr", "is_train", "max_steps"} & loaded.given and "model_path" in loaded.given
    assert loaded.notes == [f"{path}: ignored for sample: lr, max_steps (keys of train/finetune); is_train (the "
                            f"action on the command line decides)"]


def test_set_overrides_are_read_as_json_and_recorded_as_given(tmp_path):
    path = write_config(tmp_path / "c.json", BASE)
    loaded = load_config(path, "train", ["batch_size=2", "data_dir=other/folder"])
    assert loaded.config.batch_size == 2 and loaded.config.data_dir == "other/folder"
    assert {"batch_size", "data_dir", "num_classes"} <= loaded.given
    assert parse_override("s=1.5") == ("s", 1.5)


SAMPLE = {**BASE, "model_path": "m.pt"}


def balance_error(balance_args: dict, **changes) -> str:
    return error_for("sample", {**SAMPLE, **changes, "balance_args": balance_args})


def test_balance_args_are_stored_with_their_defaults_filled_in():
    config, _ = config_from_dict("sample", {**SAMPLE, "balance_args": {"based_on_pixel_count": False}})
    assert config_to_dict(config)["balance_args"] == {"max_class_dif": 0.1, "based_on_generated_data_only": False,
                                   "based_on_pixel_count": False, "ejection_classes": [0],
                                   "use_mask_augmentation": False}
    again, _ = config_from_dict("sample", {**SAMPLE, "balance_args": config.balance_args})
    assert again.balance_args == config.balance_args


def test_unknown_balance_sub_key_is_named_with_a_suggestion():
    message = balance_error({"max_class_diff": 0.2})
    assert message.startswith("configs/x.json: key 'balance_args.max_class_diff' is unknown (did you mean "
                              "'max_class_dif'?)")


def test_negative_max_class_dif_is_refused():
    assert "key 'balance_args.max_class_dif' must be >= 0" in balance_error({"max_class_dif": -0.1})


def test_balance_sub_keys_have_strict_types():
    assert "key 'balance_args.max_class_dif' must be a number" in balance_error({"max_class_dif": "0.1"})
    assert "key 'balance_args.based_on_pixel_count' must be true/false" in balance_error({"based_on_pixel_count": 1})
    assert "key 'balance_args.ejection_classes' must be a list" in balance_error({"ejection_classes": 0})
    assert "key 'balance_args.ejection_classes' must be a list" in balance_error({"ejection_classes": [True]})


def test_ejection_class_outside_the_classes_is_refused():
    message = balance_error({"ejection_classes": [0, 7]})
    assert "key 'balance_args.ejection_classes' holds class id 7, outside 0..3 (num_classes 4)" in message
    assert "class id -1" in balance_error({"ejection_classes": [-1]})


def test_ejection_classes_are_checked_against_the_checkpoint_later_when_num_classes_is_not_given():
    values = {"data_dir": "d", "model_path": "m.pt", "balance_args": {"ejection_classes": [7]}}
    config, _ = config_from_dict("sample", values)
    assert config.balance_args.ejection_classes == (7,)
    assert "outside 0..1" in error_for("sample", {**values, "dataset_mode": "binary"})  # binary: 2 classes


def test_ejecting_every_class_is_refused():
    assert "ejects all 4 classes" in balance_error({"ejection_classes": [0, 1, 2, 3]})


def test_isdm_spellings_are_translated_where_the_file_is_read_and_validate_only_checks():
    values = {**SAMPLE, "dataset_mode": "lemon-multi-class", "use_ddim": True, "use_fp16": True}
    config, _ = config_from_dict("sample", values)
    assert (config.dataset_mode, config.sampler, config.precision) == ("multi-class", "ddim", "auto")
    before = config_to_dict(config)
    config.validate()
    assert config_to_dict(config) == before


def test_nested_objects_are_read_by_the_routine_of_the_top_level_keys():
    nested = error_for("sample", {**SAMPLE, "hardness_args": {"exponent": "2"}})
    assert nested == "configs/x.json: key 'hardness_args.exponent' must be a number >= 0 (0 = hardness has no " \
                     "effect), got \"2\""
    top = error_for("sample", {**SAMPLE, "steps": "10"})
    assert top == "configs/x.json: key 'steps' must be an integer, got \"10\""
    not_finite = balance_error({"max_class_dif": float("nan")})
    assert "key 'balance_args.max_class_dif' must be a number, got NaN" in not_finite


def test_a_resolved_sample_config_reads_back_equal():
    values = {**SAMPLE, "balance_args": {"ejection_classes": [2, 0, 2]},
              "hardness_args": {"scorer": {"architecture": "FPN"}}}
    config, _ = config_from_dict("sample", values)
    assert config.balance_args.ejection_classes == (0, 2)
    assert config.hardness_args.scorer == {"architecture": "FPN"}  # evaluation's to read (test_freemask.py)
    assert config_from_dict("sample", config_to_dict(config))[0] == config


def test_the_engine_keeps_the_scorer_object_as_given_and_refuses_anything_but_an_object():
    config, _ = config_from_dict("sample", {**SAMPLE, "hardness_args": {"scorer": {"stpes": "x"}}})
    assert config.hardness_args.scorer == {"stpes": "x"}  # its keys are the scorer's: evaluation/ checks them
    assert error_for("sample", {**SAMPLE, "hardness_args": {"scorer": 3}}) == \
        "configs/x.json: key 'hardness_args.scorer' must be an object of scorer settings, got 3"


def test_shipped_configs_load():
    from pathlib import Path
    configs = Path(__file__).resolve().parents[1] / "configs"
    for action in ("train", "finetune", "sample"):
        for path in (configs / f"config_{action}.json", configs / "demo" / f"config_{action}.json"):
            assert load_config(path, action).config.data_dir == "datasets/demo", path

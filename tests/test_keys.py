"""One source for the config keys: the fields of config.py give `main.py keys` and docs/configuration.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import main
from guided_diffusion import config
from guided_diffusion.config import ACTIONS, ALIASES, CONFIG_CLASSES, IGNORED_LEGACY_KEYS, TrainConfig, option
from guided_diffusion.keys import COMMAND, PAGE, action_table, keys_text

REPO = Path(__file__).resolve().parents[1]
CLASSES = [config.CommonConfig, *CONFIG_CLASSES.values()]


def row(action: str, key: str) -> str:
    (line,) = [line for line in action_table(action).splitlines() if line.startswith(f"| `{key}` |")]
    return line


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_key_has_a_meaning_and_an_isdm_name(cls):
    for field in dataclasses.fields(cls):
        assert field.metadata.get("doc") and field.metadata.get("isdm"), f"{cls.__name__}.{field.name}"


def test_a_key_without_its_meaning_is_a_programming_error():
    with pytest.raises(TypeError, match="needs its doc"):
        option(1)


def test_the_docs_page_is_the_generated_one():
    page = (REPO / PAGE).read_text(encoding="utf-8")
    assert page == keys_text(), f"{PAGE} is stale: run `{COMMAND}`"
    assert COMMAND in page and "tests/test_keys.py" in page


def test_a_default_changed_in_code_alone_makes_the_page_stale(monkeypatch):
    @dataclasses.dataclass
    class Changed(TrainConfig):
        max_epochs: int = option(50, "stop after this many epochs")

    monkeypatch.setitem(CONFIG_CLASSES, "train", Changed)
    assert row("train", "max_epochs").startswith("| `max_epochs` | `50` |")
    assert keys_text() != (REPO / PAGE).read_text(encoding="utf-8")


def test_each_action_has_one_row_per_key_in_field_order():
    for action in ACTIONS:
        keys = [line.split("`")[1] for line in action_table(action).splitlines()[2:]]
        assert keys == [f.name for f in dataclasses.fields(CONFIG_CLASSES[action])], action


def test_rows_show_the_actions_own_defaults_as_json():
    assert row("train", "lr").startswith("| `lr` | `0.0001` | same |")
    assert row("finetune", "lr").startswith("| `lr` | `2e-05` | same |")
    assert row("finetune", "drop_rate").startswith("| `drop_rate` | `0.2` |")
    assert row("sample", "diffusion_steps").startswith("| `diffusion_steps` | `300` |")
    assert row("sample", "num_classes").startswith("| `num_classes` | `null` |")
    assert row("export", "formats").startswith('| `formats` | `["coco", "yolo-seg", "yolo-det", "semantic"]` |')


def test_isdm_spellings_are_named_and_accepted():
    assert "`weights_decay`" in row("train", "weight_decay") and ALIASES == {"weights_decay": "weight_decay"}
    assert "`lemon-binary`" in row("sample", "dataset_mode")


def test_nested_argument_objects_point_to_their_pages():
    assert "docs/balancing.md" in row("sample", "balance_args")
    assert "docs/filtering.md" in row("sample", "hardness_args")


def test_the_page_lists_the_isdm_keys_without_effect():
    page = keys_text()
    for key, reason in IGNORED_LEGACY_KEYS.items():
        assert f"| `{key}` | {reason} |" in page


def test_keys_command_prints_one_actions_table(capsys):
    assert main.main(["keys", "sample"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## `sample`\n") and row("sample", "s") in out and "## `train`" not in out


def test_keys_command_without_an_action_prints_the_page(capsys):
    assert main.main(["keys"]) == 0
    assert capsys.readouterr().out == (REPO / PAGE).read_text(encoding="utf-8")


def test_keys_command_refuses_an_unknown_action(capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["keys", "evaluate"])
    assert info.value.code == 2 and "invalid choice: 'evaluate'" in capsys.readouterr().err

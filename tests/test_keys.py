"""One source for the config keys: the fields of config.py give `main.py keys` and docs/configuration.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import main
from guided_diffusion import config
from evaluation.evaluate.config import EvaluateConfig
from evaluation.segmenter.settings import ScorerSettings
from guided_diffusion import keys
from guided_diffusion.config import (ACTIONS, ALIASES, CONFIG_CLASSES, IGNORED_LEGACY_KEYS, NO_ISDM, SAME, BalanceArgs,
                                     TrainConfig, option)
from guided_diffusion.keys import COMMAND, NESTED, PAGE, action_table, keys_text, sections, table

REPO = Path(__file__).resolve().parents[1]
NESTED_CLASSES = [cls for _, cls in NESTED]
CLASSES = [config.CommonConfig, *CONFIG_CLASSES.values(), *NESTED_CLASSES, ScorerSettings, EvaluateConfig]


def page_text() -> str:
    return (REPO / PAGE).read_text(encoding="utf-8")


def generated() -> str:
    """The whole page as `main.py keys` makes it: guided_diffusion's sections and those main.py adds."""
    return keys_text(extra=main.KEY_SECTIONS)


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
    page = page_text()
    assert page == generated(), f"{PAGE} is stale: run `{COMMAND}`"
    assert COMMAND in page and "tests/test_keys.py" in page


def test_the_page_has_a_section_per_action_nested_object_and_evaluate():
    page = page_text()
    titles = [*ACTIONS, "balance_args", "hardness_args", "hardness_args.scorer", "evaluate"]
    assert list(sections(main.KEY_SECTIONS)) == titles
    for title, cls in sections(main.KEY_SECTIONS).items():
        assert f"## `{title}`\n" in page and table(cls) in page, title


def test_nested_and_evaluate_keys_have_the_isdm_marker():
    assert {f.metadata["isdm"] for f in dataclasses.fields(BalanceArgs)} == {SAME}  # ISDM's balance_args keys
    for cls in (config.HardnessArgs, ScorerSettings, EvaluateConfig):
        assert {f.metadata["isdm"] for f in dataclasses.fields(cls)} == {NO_ISDM}, cls.__name__


def test_a_default_changed_in_code_alone_makes_the_page_stale(monkeypatch):
    @dataclasses.dataclass
    class Changed(TrainConfig):
        max_epochs: int = option(50, "stop after this many epochs")

    monkeypatch.setitem(CONFIG_CLASSES, "train", Changed)
    assert row("train", "max_epochs").startswith("| `max_epochs` | `50` |")
    assert generated() != page_text()


def test_a_nested_default_changed_in_code_alone_makes_the_page_stale(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Changed(BalanceArgs):
        max_class_dif: float = option(0.3, "largest allowed relative difference", SAME)

    monkeypatch.setattr(keys, "NESTED", (("balance_args", Changed), *NESTED[1:]))
    assert "| `max_class_dif` | `0.3` |" in keys_text("balance_args")
    assert generated() != page_text()


def test_an_evaluate_default_changed_in_code_alone_makes_the_page_stale(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Changed(EvaluateConfig):
        steps: int = option(500, "optimizer steps per training run")

    monkeypatch.setattr(main, "KEY_SECTIONS", tuple((title, Changed if title == "evaluate" else cls)
                                                    for title, cls in main.KEY_SECTIONS))
    assert "| `steps` | `500` |" in keys_text("evaluate", main.KEY_SECTIONS)
    assert generated() != page_text()


def test_guided_diffusion_alone_makes_no_section_of_evaluations_keys():
    for title in ("evaluate", "hardness_args.scorer"):  # the scorer's keys are evaluation's, as its segmenter
        assert f"## `{title}`" not in keys_text() and title not in sections()


def test_a_section_given_twice_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        sections((("sample", EvaluateConfig),))


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


def test_nested_argument_objects_point_to_their_pages_and_sections():
    assert "docs/balancing.md" in row("sample", "balance_args") and "(#balance_args)" in row("sample", "balance_args")
    assert "docs/filtering.md" in row("sample", "hardness_args")
    assert "(#hardness_args)" in row("sample", "hardness_args")


def test_a_nested_object_default_is_shown_as_an_empty_object():
    assert "| `scorer` | `{}` | — |" in keys_text("hardness_args")
    assert "| `ejection_classes` | `[0]` | same |" in keys_text("balance_args")


def test_the_page_lists_the_isdm_keys_without_effect():
    page = generated()
    for key, reason in IGNORED_LEGACY_KEYS.items():
        assert f"| `{key}` | {reason} |" in page


def test_keys_command_prints_one_actions_table(capsys):
    assert main.main(["keys", "sample"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## `sample`\n") and row("sample", "s") in out and "## `train`" not in out


def test_keys_command_without_an_action_prints_the_page(capsys):
    assert main.main(["keys"]) == 0
    assert capsys.readouterr().out == page_text()


@pytest.mark.parametrize("name", ["balance_args", "hardness_args.scorer", "evaluate"])
def test_keys_command_prints_a_nested_or_evaluate_section(capsys, name):
    assert main.main(["keys", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"## `{name}`\n") and out in page_text()


def test_keys_command_refuses_an_unknown_action(capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["keys", "evaluation"])
    assert info.value.code == 2 and "invalid choice: 'evaluation'" in capsys.readouterr().err

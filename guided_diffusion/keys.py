"""The config keys as Markdown tables, generated from the fields of config.py: `python main.py keys [section]`.

Each key's default, meaning and ISDM/SDM name are written once, next to its field (`config.option`);
docs/configuration.md is this module's output for all actions and nested objects (`balance_args`,
`hardness_args`) and the sections main.py adds, and tests/test_keys.py checks that it is current. Configs of the
layers above (evaluation's `hardness_args.scorer` and `evaluate`) are passed in as extra (title, dataclass)
sections by main.py: this module imports nothing above guided_diffusion.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Sequence

from .config import (ACTIONS, CONFIG_CLASSES, IGNORED_LEGACY_KEYS, ISDM_ACTIONS, NO_ISDM, SAME, BalanceArgs,
                     HardnessArgs)

PAGE = "docs/configuration.md"
COMMAND = f"python main.py keys > {PAGE}"
# the nested objects of a sample config, each a section of its own after the actions'
NESTED: tuple[tuple[str, type], ...] = (("balance_args", BalanceArgs), ("hardness_args", HardnessArgs))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_text(field: dataclasses.Field) -> str:
    """The default as it would be written in a JSON config, e.g. `""`, `null`, `0.0001`."""
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if dataclasses.is_dataclass(value):  # a nested object: its defaults are its own section
        return "`{}`"
    return f"`{json.dumps(value)}`"


def table(cls: type) -> str:
    """key | default | ISDM name | meaning, one row per field of a config dataclass, in field order."""
    rows = ["| key | default | ISDM name | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        rows.append(f"| `{field.name}` | {_cell(default_text(field))} | {_cell(field.metadata['isdm'])} | "
                    f"{_cell(field.metadata['doc'])} |")
    return "\n".join(rows)


def section(title: str, cls: type) -> str:
    """`## `title``, the first paragraph of the class's docstring, and its table."""
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    return f"## `{title}`\n\n{summary}\n\n{table(cls)}\n"


def action_table(action: str) -> str:
    return table(CONFIG_CLASSES[action])


def action_section(action: str) -> str:
    return section(action, CONFIG_CLASSES[action])


def sections(extra: Sequence[tuple[str, type]] = ()) -> dict[str, type]:
    """Every section of the page, title -> config class: the actions, the nested objects, then `extra`."""
    found = {**{action: CONFIG_CLASSES[action] for action in ACTIONS}, **dict(NESTED)}
    for title, cls in extra:
        if title in found:
            raise ValueError(f"keys section {title!r} given twice")
        found[title] = cls
    return found


def ignored_keys_table() -> str:
    rows = ["| key | why it has no effect here |", "|---|---|"]
    rows += [f"| `{key}` | {_cell(reason)} |" for key, reason in IGNORED_LEGACY_KEYS.items()]
    return "\n".join(rows)


def _source(cls: type) -> str:
    return f"`{cls.__module__.replace('.', '/')}.py`"


def page(extra: Sequence[tuple[str, type]] = ()) -> str:
    """docs/configuration.md: how keys are read, the ISDM/SDM keys without effect, and every section's table."""
    found = sections(extra)
    sources = list(dict.fromkeys(_source(cls) for cls in found.values()))
    source_text = ", ".join(sources[:-1]) + f" and {sources[-1]}" if len(sources) > 1 else sources[0]
    kinds = ["an action", "a nested object", *(f"[`{title}`](#{_anchor(title)})" for title, _ in extra)]
    kinds_text = ", ".join(kinds[:-1]) + f" or {kinds[-1]}"
    isdm = ", ".join(f"`{action}`" for action in ISDM_ACTIONS[:-1]) + f" and `{ISDM_ACTIONS[-1]}`"
    intro = f"""# Configuration keys

Generated from the fields of the config dataclasses ({source_text}) by
`{COMMAND}`; do not edit it by hand: `tests/test_keys.py` fails when this
page and the code differ. `python main.py keys <section>` prints one section ({kinds_text}).

A config is a flat JSON object of key: value pairs, as in ISDM. `--set key=value` overrides a key (the value is read
as JSON). Keys that start with `_` or `#` are comments. Number lists (`channel_mult`, `attention_resolutions`) may be
written `"1,2,2"` or `[1, 2, 2]`.

- **Unknown keys** are refused with one line that names the file and the key, and the closest known key
  ("did you mean").
- **Keys of another action.** {isdm} accept each other's keys, since ISDM's configs for its
  three actions share one flat key set. Such keys have no effect and are reported in one line, e.g.
  `note: config_sample.json: ignored for sample: lr (key of train/finetune); results_path (...)`.
  `export` and `import` take only their own keys.
- **ISDM name**: `{SAME}` = ISDM and SDM use the key as it is; `{NO_ISDM}` = they have no such key; otherwise
  ISDM's spelling (accepted too) or a note on how ISDM differs.
- **Nested objects** have keys of their own, each in a section below: [`balance_args`](#balance_args)
  ([balancing.md](balancing.md)), [`hardness_args`](#hardness_args) and its
  [`scorer`](#hardness_argsscorer) ([filtering.md](filtering.md)).

## ISDM/SDM keys accepted without effect

{ignored_keys_table()}
"""
    return "\n".join([intro, *(section(title, cls) for title, cls in found.items())])


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading `## `title``: lower case, punctuation other than - and _ dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def keys_text(name: str | None = None, extra: Sequence[tuple[str, type]] = ()) -> str:
    """One section (an action, a nested object or one of `extra`), or (no name) the whole docs/configuration.md
    page."""
    return section(name, sections(extra)[name]) if name else page(extra)

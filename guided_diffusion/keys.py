"""The config keys as Markdown tables, generated from the fields of config.py: `python main.py keys [action]`.

Each key's default, meaning and ISDM/SDM name are written once, next to its field (`config.option`);
docs/configuration.md is this module's output for all actions, and tests/test_keys.py checks that it is current.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

from .config import ACTIONS, CONFIG_CLASSES, IGNORED_LEGACY_KEYS, ISDM_ACTIONS, NO_ISDM, SAME

PAGE = "docs/configuration.md"
COMMAND = f"python main.py keys > {PAGE}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_text(field: dataclasses.Field) -> str:
    """The default as it would be written in a JSON config, e.g. `""`, `null`, `0.0001`."""
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return f"`{json.dumps(value)}`"


def action_table(action: str) -> str:
    """key | default | ISDM name | meaning, one row per field of the action's config class, in field order."""
    rows = ["| key | default | ISDM name | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(CONFIG_CLASSES[action]):
        rows.append(f"| `{field.name}` | {_cell(default_text(field))} | {_cell(field.metadata['isdm'])} | "
                    f"{_cell(field.metadata['doc'])} |")
    return "\n".join(rows)


def action_section(action: str) -> str:
    summary = inspect.cleandoc(CONFIG_CLASSES[action].__doc__ or "").split("\n\n")[0].replace("\n", " ")
    return f"## `{action}`\n\n{summary}\n\n{action_table(action)}\n"


def ignored_keys_table() -> str:
    rows = ["| key | why it has no effect here |", "|---|---|"]
    rows += [f"| `{key}` | {_cell(reason)} |" for key, reason in IGNORED_LEGACY_KEYS.items()]
    return "\n".join(rows)


def page() -> str:
    """docs/configuration.md: how keys are read, the ISDM/SDM keys without effect, and every action's table."""
    isdm = ", ".join(f"`{action}`" for action in ISDM_ACTIONS[:-1]) + f" and `{ISDM_ACTIONS[-1]}`"
    intro = f"""# Configuration keys

Generated from the fields of `guided_diffusion/config.py` by
`{COMMAND}`; do not edit it by hand: `tests/test_keys.py` fails when this
page and the code differ. `python main.py keys <action>` prints one action's table.

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
- **Nested objects** have keys of their own: `balance_args` in [balancing.md](balancing.md), `hardness_args` in
  [filtering.md](filtering.md).

## ISDM/SDM keys accepted without effect

{ignored_keys_table()}
"""
    return "\n".join([intro, *(action_section(action) for action in ACTIONS)])


def keys_text(action: str | None = None) -> str:
    """One action's section, or (no action) the whole docs/configuration.md page."""
    return action_section(action) if action else page()

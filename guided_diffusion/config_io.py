"""The one routine that reads a JSON object into a typed config dataclass, and the helpers of the checks after it.

Every config of the project is a dataclass read by `read`: the actions' configs (config.py) with their nested
objects (`balance_args`, `hardness_args`), the evaluation's config (evaluation/evaluate/config.py), FreeMask's
scorer and filter settings (evaluation/segmenter/settings.py, evaluation/freemask.py) and the low-data study's
config with its segmenter, generators and variants (evaluation/study/config.py). Reading a config is two steps,
always in this order:

1. `read(cls, values, where)`: where the dict is read. Comment keys ('_...', '#...') are skipped, an alias
   (a field's `alias`, e.g. ISDM's `weights_decay`) becomes its key, an unknown key is refused (or handed to the
   caller's `unknown`, which may accept it), each value is checked against the field's type annotation (a bool
   is no number, a float must be finite, a list's items are checked too) and brought to its one form (an
   integer for a float key becomes a float, a list for a tuple key a tuple, then the field's `canonical`, e.g.
   'lemon-binary' -> 'binary'). A field whose type is a dataclass is read the same way, its keys named
   `<where>.<key>`; so is each item of a field typed `list[X]` (named `<key>[i]`) or `dict[str, X]` (an object of
   named items, `<key>.<name>`; comment keys skipped), where X is a dataclass or, for the object, any type but Any.
2. `validate()` of the dataclass: only checks (ranges, keys that must agree), never changes a value; it raises
   `KeyProblem` through `require`. A parent validates its nested objects `within` their key, so a problem is
   named by its full path ('balance_args.ejection_classes'), and may pass them what they need of its own keys.

Every problem is a one-line `ConfigError` naming the key, e.g. "key 'batch_size' must be an integer, got \"8\"";
the caller prefixes the file. A field may word its expected type itself (`expect`), e.g. "a folder path".
This module knows no config: it imports only the error types, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

COMMENT_PREFIXES = ("_", "#")


class KeyProblem(ConfigError):
    """A ConfigError about one key: "key '<key>' <message>". `within` prefixes the key of a nested object."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"key '{key}' {message}")


def require(condition: bool, key: str, message: str) -> None:
    """KeyProblem(key, message) unless `condition`."""
    if not condition:
        raise KeyProblem(key, message)


@contextmanager
def within(prefix: str) -> Iterator[None]:
    """Problems raised inside name their key as `<prefix>.<key>` (a nested object's checks)."""
    try:
        yield
    except KeyProblem as problem:
        raise KeyProblem(f"{prefix}.{problem.key}", problem.message) from None


def did_you_mean(key: object, names: list[str] | set[str]) -> str:
    """' (did you mean 'x'?)' for the known name closest to a mistyped key, else ''."""
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def refuse_unknown_sub_keys(values: Mapping[str, Any], names: list[str], where: str) -> None:
    """ConfigError for the first key of a nested object (e.g. balance_args) that is not one of `names`."""
    for key in values:
        if key not in names:
            raise ConfigError(f"key '{where}.{key}' is unknown{did_you_mean(key, names)}; {where} takes "
                              f"{', '.join(names)}")


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, expect: str = "",
            alias: str = "", canonical: Callable[[Any, str], Any] | None = None, **metadata: Any) -> Any:
    """A dataclass field with what `read` needs beyond its type: `expect` (the expected value in words, for the
    type message; default: from the annotation), `alias` (another accepted spelling of the key) and `canonical`
    (called as canonical(value, key) on a value of the right type: returns its one form or raises ConfigError)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={**metadata, "expect": expect, "alias": alias, "canonical": canonical})


# ---------------------------------------------------------------------------------------------------------------
# Types


def type_ok(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a type annotation (bool is no number; a float is finite; list items checked)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if origin is Literal:  # by type too: true == 1 must not pass for Literal[0, 1]
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        item = typing.get_args(annotation)[0]
        return isinstance(value, (list, tuple)) and all(type_ok(v, item) for v in value)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int) and not isinstance(value, bool) or \
            isinstance(value, float) and math.isfinite(value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation))
    return isinstance(value, annotation)


def describe(annotation: Any) -> str:
    """The annotation in words, as a type message says it: 'an integer', 'a list of a number', 'one of 1, 3'."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"a list of {describe(typing.get_args(annotation)[0])}"
    if origin is dict or dataclasses.is_dataclass(annotation):
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "an object",
            type(None): "null"}.get(annotation, str(annotation))


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def expected(cls: type, name: str) -> str:
    """What key `name` of dataclass `cls` takes, in words (its `expect`, else its annotation described)."""
    return _fields(cls)[name].metadata.get("expect") or describe(_hints(cls)[name])


def _nested_class(annotation: Any) -> type | None:
    """The dataclass of a field typed `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _one_form(value: Any, annotation: Any) -> Any:
    """A checked value in the form the field holds: floats for float keys, tuples for tuple keys."""
    origin = typing.get_origin(annotation)
    if annotation is float and not isinstance(value, float):
        return float(value)
    if origin in (typing.Union, types.UnionType) and float in typing.get_args(annotation) and \
            isinstance(value, int) and not isinstance(value, bool) and int not in typing.get_args(annotation):
        return float(value)
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        return tuple(_one_form(v, item) for v in value)
    if origin is list:
        item = typing.get_args(annotation)[0]
        return [_one_form(v, item) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# The routine


UnknownKey = Callable[[str, str], bool]
"""unknown(key as written, key after aliases) -> True to skip the key; it raises ConfigError to refuse it."""


def read(cls: type, values: Mapping[str, Any], where: str = "", unknown: UnknownKey | None = None) -> Any:
    """Build dataclass `cls` from a JSON object (see the module docstring); a value already of class `cls` is
    returned as it is. `where` names the object in messages ('balance_args'; '' at the top level). Without
    `unknown` an unknown key is refused with the close key and the object's keys. Does not validate."""
    if isinstance(values, cls):
        return values
    fields, hints = _fields(cls), _hints(cls)
    aliases = {f.metadata["alias"]: name for name, f in fields.items() if f.metadata.get("alias")}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if str(key).startswith(COMMENT_PREFIXES):
            continue  # comment keys
        name = aliases.get(key, key)
        if name not in fields:
            if unknown is not None and unknown(key, name):
                continue
            if where:
                refuse_unknown_sub_keys({key: value}, list(fields), where)
            raise ConfigError(f"key '{key}' is unknown{did_you_mean(key, list(fields))}")
        if name in kwargs:
            raise ConfigError(f"key '{_path(where, name)}' is given twice (as '{key}' and an alias)")
        kwargs[name] = read_value(value, hints[name], fields[name], _path(where, key))
    try:
        return cls(**kwargs)
    except KeyProblem as problem:  # a dataclass that checks itself when made (__post_init__)
        if not where:
            raise
        raise KeyProblem(_path(where, problem.key), problem.message) from None


def read_value(value: Any, annotation: Any, field: dataclasses.Field | None, key: str) -> Any:
    """One value of key `key` checked against its annotation and brought to its one form (module docstring).
    `field` None: an item of a list or object field, read by its annotation alone (the field's `expect` and
    `canonical` are the container's)."""
    nested = _nested_class(annotation)
    if nested is not None and isinstance(value, dict):
        return read(nested, value, key)
    container, item = typing.get_origin(annotation), _item_annotation(annotation)
    if item is not None and container is list and isinstance(value, list):
        value = [read_value(v, item, None, f"{key}[{i}]") for i, v in enumerate(value)]
    elif item is not None and container is dict and isinstance(value, dict):
        value = {name: read_value(v, item, None, f"{key}.{name}") for name, v in value.items()
                 if not str(name).startswith(COMMENT_PREFIXES)}
    elif type_ok(value, annotation):
        value = _one_form(value, annotation)
    else:
        expect = field.metadata.get("expect") if field is not None else ""
        raise KeyProblem(key, f"must be {expect or describe(annotation)}, got {_json(value)}")
    canonical = field.metadata.get("canonical") if field is not None else None
    return canonical(value, key) if canonical is not None and value is not None else value


def _item_annotation(annotation: Any) -> Any:
    """The annotation of the items read one by one, each under its own key: X of `list[X]` for a dataclass X,
    X of `dict[str, X]` for any X but Any (an object of named items); else None (the value is checked whole)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    if origin is dict and len(args) == 2 and args[1] is not Any:
        return args[1]
    return None


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_json_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON values: nested objects as dicts, tuples as lists (what `read` reads back)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The key: value pairs of a JSON config file (ConfigError for a missing file or invalid JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object of key: value pairs")
    return values

"""The config routine of guided_diffusion/config_io.py: lists and objects of items, each read under its own key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from guided_diffusion.config_io import read, to_json_dict
from guided_diffusion.errors import ConfigError


@dataclass(frozen=True)
class Item:
    name: str = ""
    size: float = 1.0


@dataclass(frozen=True)
class Holder:
    items: list[Item] = field(default_factory=list)
    named: dict[str, Item] = field(default_factory=dict)
    counts: dict[str, int | None] = field(default_factory=dict)
    free: dict[str, Any] = field(default_factory=dict)


def error_for(values: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        read(Holder, values)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_list_of_objects_is_read_item_by_item():
    holder = read(Holder, {"items": [{"name": "a", "size": 2}, {"_note": "skipped", "name": "b"}]})
    assert holder.items == [Item("a", 2.0), Item("b")]
    assert isinstance(holder.items[0].size, float)


def test_an_object_of_named_objects_is_read_item_by_item_without_its_comment_keys():
    holder = read(Holder, {"named": {"_about": "a comment", "x": {"size": 3}}})
    assert holder.named == {"x": Item(size=3.0)}


def test_a_bad_item_is_named_by_its_position_or_its_name():
    assert error_for({"items": [{"name": "a"}, {"nmae": "b"}]}) == \
        "key 'items[1].nmae' is unknown (did you mean 'name'?); items[1] takes name, size"
    assert error_for({"items": [3]}) == "key 'items[0]' must be an object, got 3"
    assert error_for({"named": {"x": {"size": "big"}}}) == "key 'named.x.size' must be a number, got \"big\""
    assert error_for({"counts": {"x": 1, "y": 1.5}}) == "key 'counts.y' must be an integer or null, got 1.5"
    assert error_for({"items": {"name": "a"}}) == "key 'items' must be a list of an object, got {\"name\": \"a\"}"


def test_an_object_of_any_values_is_kept_as_written():
    holder = read(Holder, {"free": {"_note": "kept", "k": [1, "a"]}, "counts": {"x": None}})
    assert holder.free == {"_note": "kept", "k": [1, "a"]} and holder.counts == {"x": None}


def test_items_read_back_equal():
    holder = read(Holder, {"items": [{"name": "a"}], "named": {"x": {"size": 2}}, "counts": {"x": 3}})
    assert read(Holder, to_json_dict(holder)) == holder

"""Bundling JSON schemas' references (workers/engines/llama_cpp/schema_refs.py): plain data in,
plain data out, so checked here without a model; the grammars built from them are checked on
the real model through the bridge (tests/test_models.py)."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import ApiError
from workers.engines.llama_cpp.schema_refs import Bundle


def bundled(*schemas: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    bundle = Bundle()
    added = [bundle.add(schema, f"t{i}", f"tools[{i}].function.parameters") for i, schema in enumerate(schemas)]
    return added, bundle.document({"anyOf": added})


def test_clashing_names_get_a_def_each() -> None:
    a = {"properties": {"x": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": {"type": "string"}}}
    b = {"properties": {"y": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": {"type": "integer"}}}
    (first, second), document = bundled(a, b)
    assert first == {"properties": {"x": {"$ref": "#/$defs/t0-Item"}}}
    assert second == {"properties": {"y": {"$ref": "#/$defs/t1-Item"}}}
    assert document["$defs"] == {"t0-Item": {"type": "string"}, "t1-Item": {"type": "integer"}}


def test_recursion_inside_a_value_is_kept_and_data_is_not_a_reference() -> None:
    tree = {
        "type": "object",
        "properties": {"children": {"type": "array", "items": {"$ref": "#"}}, "$ref": {"const": {"$ref": "#"}}},
    }
    (root,), document = bundled(tree)
    assert root["properties"]["children"]["items"] == {"$ref": "#/$defs/t0-root"}
    assert root["properties"]["$ref"] == {"const": {"$ref": "#"}}  # a property named $ref, a const value
    assert document["$defs"]["t0-root"]["properties"]["children"]["items"] == {"$ref": "#/$defs/t0-root"}


def test_json_pointer_escapes() -> None:
    schema = {"properties": {"x": {"$ref": "#/definitions/a~1b%20c"}}, "definitions": {"a/b c": {"type": "null"}}}
    (root,), document = bundled(schema)
    assert document["$defs"][root["properties"]["x"]["$ref"].removeprefix("#/$defs/")] == {"type": "null"}


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"$ref": "#/$defs/A", "$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}]}}}, "#/$defs/A -> #/$defs/A"),
        ({"properties": {"x": {"$ref": "other.json#/Item"}}}, "'other.json#/Item'"),
        ({"properties": {"x": {"$ref": "#anchor"}}}, "'#anchor'"),
        ({"properties": {"x": {"$ref": "#/$defs/Nope"}}}, "'#/$defs/Nope'"),
        ({"properties": {"x": {"$ref": "#/required"}}, "required": ["x"]}, "'#/required'"),
    ],
)
def test_unusable_references_are_400_naming_them(schema: dict[str, Any], named: str) -> None:
    with pytest.raises(ApiError) as caught:
        bundled({"type": "object"}, schema)
    assert named in caught.value.message
    assert caught.value.param == "tools[1].function.parameters"

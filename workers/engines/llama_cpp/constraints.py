"""Compact JSON grammars for llama.cpp: JSON mode, JSON schemas and forced tool calls.

llama.cpp's stock grammars let the model put spaces and newlines between any
two JSON tokens. A small model spends its budget there: SmolLM2-135M wrote
``{ "name" : "get_weather", "arguments" : { "city" `` and was cut at 32
tokens. These grammars allow no whitespace outside strings, as xgrammar's
``any_whitespace=False`` and vLLM's ``disable-any-whitespace`` do, except
for at most one space after ``:`` and ``,`` (see SEPARATOR). The output stays
valid JSON, and for schemas, schema-conformant JSON.

Also here: reading back a forced tool call, complete or cut short.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# After ':' and ','. Measured on SmolLM2-135M (bench/grammar_compact.py, figures in
# bench/RESULTS.md): with one space allowed, JSON mode answers took 31.9 tokens on
# average and 7/8 were valid within 128 tokens; with none, 58.5 and 6/8; stock, 68.8 and 5/8.
SEPARATOR = '" "?'

JSON_OBJECT_GBNF = rf"""
root   ::= object
value  ::= object | array | string | number | "true" | "false" | "null"
object ::= "{{" ( string ":" sep value ( "," sep string ":" sep value )* )? "}}"
array  ::= "[" ( value ( "," sep value )* )? "]"
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{{4}} ) )* "\""
number ::= "-"? ( [0-9] | [1-9] [0-9]{{0,15}} ) ( "." [0-9]{{1,15}} )? ( [eE] [-+]? [0-9]{{1,15}} )?
sep    ::= {SEPARATOR}
"""


def schema_gbnf(schema: dict[str, Any]) -> str:
    """A GBNF grammar for JSON conforming to ``schema``, with no free whitespace.

    llama-cpp-python's converter puts its ``space`` rule after every literal;
    here it is empty, and the separators after ``:`` and ``,`` get SEPARATOR.
    Property order is the schema's own order (the grammar imposes it).
    """
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter._rules["space"] = '""'
    converter.visit(converter.resolve_refs(schema, "schema"), "")
    gbnf = converter.format_grammar()
    # The converter writes every separator as `":" space` / `"," space`.
    gbnf = gbnf.replace('":" space', '":" sep').replace('"," space', '"," sep')
    return gbnf + f"\nsep ::= {SEPARATOR}\n"


def tool_call_schema(schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The schema of a forced call: the function's arguments, or a {name, arguments} union."""
    if len(schemas) == 1:
        return next(iter(schemas.values()))
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": arguments},
                "required": ["name", "arguments"],
            }
            for name, arguments in schemas.items()
        ]
    }


@dataclass
class ParsedCall:
    name: str
    # The arguments as JSON text: complete, or the partial text of a call cut short.
    arguments: str
    complete: bool


# The start of a union call, as the grammar writes it: {"name":"...","arguments":
_UNION_HEAD = re.compile(r'\{"name":\s?"((?:[^"\\]|\\.)*)",\s?"arguments":\s?(.*)\Z', re.DOTALL)


def parse_tool_call(names: list[str], text: str) -> ParsedCall | None:
    """The call in ``text``, the grammar-constrained output for ``names``.

    A complete call comes back with its arguments re-serialised. A call cut
    short (max_tokens) comes back with the partial arguments text, as OpenAI
    returns it, once its function is known; before that there is no call.
    """
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if len(names) == 1:
        if isinstance(value, dict):
            return ParsedCall(names[0], json.dumps(value, ensure_ascii=False), True)
        return ParsedCall(names[0], text, False) if text else None
    if isinstance(value, dict) and value.get("name") in names and "arguments" in value:
        return ParsedCall(value["name"], json.dumps(value["arguments"], ensure_ascii=False), True)
    head = _UNION_HEAD.match(text)
    if head is None:
        return None
    name = json.loads(f'"{head.group(1)}"')
    return ParsedCall(name, head.group(2), False) if name in names else None


def tool_instructions(functions: list[tuple[str, str, dict[str, Any]]]) -> str:
    """What the model is told when a call is forced and its chat template cannot show tools.

    ``functions`` holds (name, description, parameters schema). A grammar alone
    keeps the output valid, but a model that was never asked for JSON fights
    it: SmolLM2-135M spelled `{"name"` letter by letter and filled arguments
    with noise. Told the functions and the form, it writes the call in about
    20 tokens (llama.cpp's server does the same for templates without tools).
    """
    lines = []
    for name, description, schema in functions:
        args = ", ".join(f"{arg}: {spec.get('type', 'any')}" for arg, spec in schema.get("properties", {}).items())
        lines.append(f"- {name}({args})" + (f": {description}" if description else ""))
    if len(functions) == 1:
        form = f'the arguments of {functions[0][0]} as one JSON object, {{"<argument>": <value>}}'
    else:
        form = 'one JSON object that calls one of them, {"name": "<function name>", "arguments": {<its arguments>}}'
    return "You answer by calling a function. The functions:\n" + "\n".join(lines) + f"\nAnswer only with {form}."

"""Constrained output: JSON mode, JSON schemas and forced tool calls, as compact grammars for llama.cpp.

llama.cpp's stock grammars let the model put spaces and newlines between any
two JSON tokens. A small model spends its budget there: SmolLM2-135M wrote
``{ "name" : "get_weather", "arguments" : { "city" `` and was cut at 32
tokens. These grammars allow no whitespace outside strings, as xgrammar's
``any_whitespace=False`` and vLLM's ``disable-any-whitespace`` do, except
for at most one space after ``:`` and ``,`` (see SEPARATOR). The output stays
valid JSON, and for schemas, schema-conformant JSON.

Tools: with ``tool_choice`` naming a function (or "required"), the output is
constrained by a grammar built from the function's parameters schema (or,
for several tools, from a ``{"name", "arguments"}`` union) and returned as a
tool call. With "auto" or no choice the model just writes text: the GGUF
template of the default model has no tool syntax to parse.

Also here: reading back a forced tool call, complete or cut short, and
:class:`Constraints`, which picks each request's grammar and compiles it once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from common import errors
from tokenwire.v1 import worker_pb2

# After ':' and ','. Measured on SmolLM2-135M (bench/experiments/grammar_compact.py, figures in
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


# -- Each request's constraints -------------------------------------------------

_GRAMMAR_CACHE_SIZE = 256


@dataclass
class ToolPlan:
    """A forced tool call: the output is constrained to one of these functions."""

    names: list[str]


class Constraints:
    """What a request's output must follow: its grammar (compiled once per source text), a forced
    tool call, and what the model must be told that its chat template cannot say."""

    def __init__(self, vocab: Any, shows_tools: bool) -> None:
        self._vocab = vocab  # the llama_vocab pointer, to check grammars against
        self._shows_tools = shows_tools  # the chat template renders `tools` itself
        self.grammars: dict[str, Any] = {}  # source key -> LlamaGrammar

    def of(self, request: worker_pb2.GenerateRequest) -> tuple[Any, ToolPlan | None, str]:
        """The grammar the output must follow, the forced tool call if any, and what to tell the model."""
        tools = forced_tools(request)
        if tools is not None:
            functions = []
            for tool in request.tools:
                if tool.function.name in tools.names:
                    params = (
                        struct_to_json(MessageToDict(tool.function.parameters))
                        if tool.function.HasField("parameters")
                        else {}
                    )
                    functions.append((tool.function.name, tool.function.description, params or {"type": "object"}))
            grammar = self._schema_grammar(tool_call_schema({n: p for n, _, p in functions}), "tools")
            instructions = "" if self._shows_tools else tool_instructions(functions)
            return grammar, tools, instructions
        kind = request.response_format.type
        if kind in ("", "text"):
            return None, None, ""
        if kind == "json_object":
            return self._grammar("json_object", lambda: JSON_OBJECT_GBNF, "response_format"), None, ""
        if kind == "json_schema":
            schema = struct_to_json(MessageToDict(request.response_format.json_schema.schema))
            # Not told the schema: that made SmolLM2 worse (2/4 valid, against 3/4 untold).
            return self._schema_grammar(schema, "response_format"), None, ""
        raise errors.invalid_request(
            f"Unknown response_format type `{kind}`; use text, json_object or json_schema.", param="response_format"
        )

    def _grammar(self, key: str, make_gbnf: Any, param: str) -> Any:
        """A compiled, validated grammar, cached by its source text."""
        from llama_cpp import llama_cpp as C
        from llama_cpp.llama_grammar import LlamaGrammar

        grammar = self.grammars.get(key)
        if grammar is not None:
            return grammar
        try:
            grammar = LlamaGrammar.from_string(make_gbnf(), verbose=False)
        except Exception as exc:
            raise errors.invalid_request(f"Invalid JSON schema: {exc}", param=param) from exc
        # llama.cpp parses the grammar only when a sampler is made: check it now.
        sampler = C.llama_sampler_init_grammar(self._vocab, grammar._grammar.encode(), grammar._root.encode())
        if not sampler:
            raise errors.invalid_request("The JSON schema cannot be turned into a grammar.", param=param)
        C.llama_sampler_free(sampler)
        if len(self.grammars) >= _GRAMMAR_CACHE_SIZE:
            self.grammars.clear()
        self.grammars[key] = grammar
        return grammar

    def _schema_grammar(self, schema: dict[str, Any], param: str) -> Any:
        text = json.dumps(schema)  # not sorted: key order is the order the grammar imposes
        return self._grammar("schema:" + text, lambda: schema_gbnf(schema), param)


def forced_tools(request: worker_pb2.GenerateRequest) -> ToolPlan | None:
    """Tools the model must call. "auto" (and no choice) just generates text."""
    if not request.tools:
        return None
    names = [t.function.name for t in request.tools]
    choice = request.tool_choice
    if choice.HasField("function"):
        name = choice.function.function.name
        if name not in names:
            raise errors.invalid_request(f"tool_choice names `{name}`, which is not in tools.", param="tool_choice")
        return ToolPlan([name])
    if choice.mode == "required":
        return ToolPlan(names)
    return None


def struct_to_json(value: Any) -> Any:
    """A protobuf Struct's value as JSON, with integral numbers back as ints.

    Struct stores every number as a double; a schema's ``maxLength: 20``
    arrives as 20.0, which llama.cpp's schema converter cannot use.
    """
    if isinstance(value, dict):
        return {k: struct_to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [struct_to_json(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value

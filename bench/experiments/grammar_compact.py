"""Compact JSON grammars against llama.cpp's stock ones, on the embedded SmolLM2-135M.

For each grammar variant and each prompt (JSON mode, JSON schema, forced tool
calls; greedy), it counts the tokens of the answer and whether it finished
as valid JSON (schema-valid for schemas, a parseable call for tools) within
the budget.

    .venv/bin/python -m bench.experiments.grammar_compact
"""

from __future__ import annotations

import asyncio
import json
import statistics
from typing import Any

import jsonschema

from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Generation
from workers.engines.llama_cpp import constraints as grammars
from workers.engines.llama_cpp import loading
from workers.engines.llama_cpp.engine import LlamaCppEngine

BUDGET = 128

JSON_PROMPTS = [
    "Give me a JSON object with a key name and a key age.",
    "Give me a JSON object describing Paris with keys city and country.",
    "Describe a cat as JSON.",
    "Return a JSON object listing three fruits under the key fruits.",
    "Give me a JSON object for a book with title, author and year.",
    "Reply in JSON: what is 2 + 2? Use the key answer.",
    "Make a JSON object describing the weather today.",
    "Give me a JSON object with your favourite colour.",
]

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
BOOK = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "author": {"type": "string"},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "author", "year", "tags"],
}
SCHEMA_CASES = [
    ("Give me a person as JSON.", PERSON),
    ("Invent a person called Ann who is 30.", PERSON),
    ("Describe a famous book as JSON.", BOOK),
    ("Tell me about Moby Dick.", BOOK),
]


def _tool(name: str, arg: str) -> common_pb2.Tool:
    tool = common_pb2.Tool(type="function")
    tool.function.name = name
    tool.function.parameters.update({"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]})
    return tool


TOOLS = [_tool("get_weather", "city"), _tool("get_time", "timezone")]
TOOL_PROMPTS = [
    "What is the weather like in Paris today?",
    "What time is it in Tokyo?",
    "Is it raining in London?",
    "Tell me the time in New York.",
]


def stock(schema: dict[str, Any] | None) -> str:
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    return JSON_GBNF if schema is None else json_schema_to_gbnf(json.dumps(schema))


# label: (the separator after ':' and ',', or None for llama.cpp's stock grammars; whether the model is told)
VARIANTS: dict[str, tuple[str | None, bool]] = {
    "llama.cpp stock": (None, False),
    "compact, no space": ('""', False),
    "compact, one space allowed": ('" "?', False),
    "compact, one space allowed, model told the tools": ('" "?', True),
}
ORIGINAL = (grammars.JSON_OBJECT_GBNF, grammars.schema_gbnf, grammars.tool_instructions)


def use(separator: str | None, told: bool) -> None:
    """Point the engine's grammar builders at one variant."""
    json_gbnf, schema_gbnf, tool_instructions = ORIGINAL
    grammars.tool_instructions = tool_instructions if told else lambda functions: ""  # type: ignore[assignment]
    if separator is None:
        grammars.JSON_OBJECT_GBNF = stock(None)
        grammars.schema_gbnf = stock  # type: ignore[assignment]
        return
    grammars.SEPARATOR = separator
    grammars.JSON_OBJECT_GBNF = json_gbnf.replace('sep    ::= " "?', f"sep    ::= {separator}")
    grammars.schema_gbnf = schema_gbnf  # type: ignore[assignment]


async def answer(engine: LlamaCppEngine, request: worker_pb2.GenerateRequest) -> tuple[str, int, str, list]:
    prepared = await engine.prepare(request)
    deltas = [d async for ready in engine.generate(request, prepared, BUDGET, Generation()) for d in ready]
    text = "".join(d.text for d in deltas)
    return text, sum(d.token_count for d in deltas), deltas[-1].finish_reason, deltas[-1].tool_calls


def chat(prompt: str, **kwargs: Any) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=prompt)],
        sampling=worker_pb2.SamplingParams(temperature=0),
        **kwargs,
    )


async def measure(engine: LlamaCppEngine) -> dict[str, dict[str, tuple[float, int, int]]]:
    results: dict[str, dict[str, tuple[float, int, int]]] = {}
    for label, variant in VARIANTS.items():
        use(*variant)
        engine._constraints.grammars.clear()
        rows: dict[str, list[tuple[int, bool]]] = {"json_object": [], "json_schema": [], "tools (2, required)": []}
        for prompt in JSON_PROMPTS:
            text, n, finish, _ = await answer(engine, chat(prompt, response_format={"type": "json_object"}))
            try:
                ok = finish == "stop" and isinstance(json.loads(text), dict)
            except ValueError:
                ok = False
            rows["json_object"].append((n, ok))
        for prompt, schema in SCHEMA_CASES:
            rf = common_pb2.ResponseFormat(type="json_schema")
            rf.json_schema.schema.update(schema)
            text, n, finish, _ = await answer(engine, chat(prompt, response_format=rf))
            try:
                jsonschema.validate(json.loads(text), schema)
                ok = finish == "stop"
            except (ValueError, jsonschema.ValidationError):
                ok = False
            rows["json_schema"].append((n, ok))
        for prompt in TOOL_PROMPTS:
            request = chat(prompt, tools=TOOLS, tool_choice=common_pb2.ToolChoice(mode="required"))
            _, n, finish, calls = await answer(engine, request)
            rows["tools (2, required)"].append((n, finish == "tool_calls" and len(calls) == 1))
        results[label] = {
            kind: (statistics.mean(n for n, _ in r), max(n for n, _ in r), sum(ok for _, ok in r))
            for kind, r in rows.items()
        }
    use('" "?', True)
    return results


def main() -> None:
    engine = LlamaCppEngine(loading.default_model_path())
    asyncio.run(engine.start())
    results = asyncio.run(measure(engine))
    asyncio.run(engine.close())
    counts = {
        "json_object": len(JSON_PROMPTS),
        "json_schema": len(SCHEMA_CASES),
        "tools (2, required)": len(TOOL_PROMPTS),
    }
    print(f"greedy, budget {BUDGET} tokens; tokens per answer (mean / max) and answers valid and finished")
    print(f"| grammar | {' | '.join(counts)} |")
    print("|---|" + "---|" * len(counts))
    for label, kinds in results.items():
        cells = [f"{mean:.1f} / {top} tok, {ok}/{counts[k]} valid" for k, (mean, top, ok) in kinds.items()]
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()

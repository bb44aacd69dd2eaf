"""JSON schemas' ``$ref``s, bundled into one document that a grammar can be built from.

A reference is relative to the root of the schema it is written in: ``#/$defs/Item``
in a tool's parameters means that tool's ``Item``. Put several tools' parameters
under one ``anyOf`` (``tool_choice: "required"``) and their references point at
nothing, or two tools' ``Item`` at one. So every target is copied once into one
``$defs`` under a name of its own (the tool's name, then the target's), and every
reference is rewritten to it. What cannot become a grammar is refused here, naming
the reference: a reference outside the schema (a URL, another file, an anchor), one
that points at nothing, and a cycle of references that never reaches a value
(``A`` is ``B``, ``B`` is ``A``). A recursive schema whose reference sits inside a
value (a tree whose ``children`` are trees) is a grammar, and is kept.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from common import errors

# Keywords whose value is data, not a schema: a "$ref" in there is no reference.
_DATA = frozenset({"const", "enum", "default", "examples"})
# Keywords whose value maps names to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas"})
_DEFINITIONS = frozenset({"$defs", "definitions"})
# A schema that is one of these, or holds refs under them, is its references' value (nothing read first).
_ALTERNATIVES = ("anyOf", "oneOf", "allOf")
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9-]+")


class Bundle:
    """Schemas' references, each target once in :attr:`defs`."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}
        self._names: dict[tuple[int, str], str] = {}  # (the root's id, the JSON pointer) -> its name in defs
        self._origins: dict[str, tuple[str, str]] = {}  # a def's name -> its reference and the param it came in

    def add(self, root: Any, label: str, param: str) -> Any:
        """``root`` (one schema) with every reference rewritten to ``#/$defs/<name>``."""
        return self._schema(root, root, label, param)

    def document(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` (built from what :meth:`add` returned) with the bundled ``$defs``, once
        no cycle of references is empty."""
        self._check_cycles()
        return {**schema, "$defs": self.defs} if self.defs else schema

    def _schema(self, node: Any, root: Any, label: str, param: str) -> Any:
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            return {"$ref": "#/$defs/" + self._target(ref, root, label, param)}
        copy: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DEFINITIONS:
                continue  # reached through references only, and then from the bundle
            if key in _DATA:
                copy[key] = value
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                copy[key] = {name: self._schema(item, root, label, param) for name, item in value.items()}
            elif isinstance(value, list):
                copy[key] = [self._schema(item, root, label, param) for item in value]
            else:
                copy[key] = self._schema(value, root, label, param)
        return copy

    def _target(self, ref: str, root: Any, label: str, param: str) -> str:
        """The name in defs of what ``ref`` points at, bundling it the first time."""
        if not ref.startswith("#") or (ref != "#" and not ref.startswith("#/")):
            raise errors.invalid_request(
                f"Unsupported $ref '{ref}' in {param}: only references within the schema (#/...) are supported.",
                param,
            )
        key = (id(root), ref)
        name = self._names.get(key)
        if name is not None:
            return name
        target = root
        for token in ref[2:].split("/") if ref != "#" else ():
            token = unquote(token).replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            elif isinstance(target, dict) and token in target:
                target = target[token]
            else:
                raise errors.invalid_request(f"$ref '{ref}' in {param} points at nothing in its schema.", param)
        if target is True:
            target = {}
        if not isinstance(target, dict):
            raise errors.invalid_request(f"$ref '{ref}' in {param} points at no schema.", param)
        base = _NOT_A_NAME.sub("-", f"{label}-{ref.rsplit('/', 1)[-1] if ref != '#' else 'root'}").strip("-")
        name, n = base, 1
        while name in self.defs:
            name, n = f"{base}-{n}", n + 1
        self._names[key] = name
        self._origins[name] = (ref, param)
        self.defs[name] = {}  # reserved: a recursive target refers to its own name
        self.defs[name] = self._schema(target, root, label, param)
        return name

    def _check_cycles(self) -> None:
        """A 400 for references that lead back to themselves before any value begins."""
        done: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            if name in path:
                refs = [self._origins[n][0] for n in [*path[path.index(name) :], name]]
                param = self._origins[name][1]
                raise errors.invalid_request(
                    f"Cyclic $ref in {param}: {' -> '.join(refs)} never reaches a value.", param
                )
            if name in done:
                return
            for target in _first_refs(self.defs[name]):
                visit(target, [*path, name])
            done.add(name)

        for name in self.defs:
            visit(name, [])


def _first_refs(schema: Any) -> set[str]:
    """The defs ``schema`` is, or is one of, before any of its value is read."""
    if not isinstance(schema, dict):
        return set()
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return {ref.removeprefix("#/$defs/")}
    found: set[str] = set()
    for key in _ALTERNATIVES:
        for alternative in schema.get(key) or ():
            found |= _first_refs(alternative)
    return found

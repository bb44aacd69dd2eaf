"""The layering rule, read from the source: the command line -> the three parts -> common -> tokenwire.v1.

- ``gateway``, ``workers`` and ``rest_bridge`` never import each other (they talk over gRPC);
- ``common`` imports none of them;
- nothing imports ``tokenwire_cli``, the composition root (tests aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("gateway", "workers", "rest_bridge")
OWN = (*PARTS, "common", "tokenwire_cli")


def imports(package: str) -> list[tuple[str, str]]:
    """(file, top-level package) for every import of one of ours in a package, local imports too."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [(str(path.relative_to(ROOT)), name.split(".")[0]) for name in names if name.split(".")[0] in OWN]
    return found


@pytest.mark.parametrize("part", PARTS)
def test_parts_import_only_common_and_themselves(part: str) -> None:
    wrong = [(file, name) for file, name in imports(part) if name not in (part, "common")]
    assert not wrong, wrong


def test_common_imports_no_part() -> None:
    wrong = [(file, name) for file, name in imports("common") if name != "common"]
    assert not wrong, wrong


def test_nothing_imports_the_command_line() -> None:
    wrong = [
        (file, name) for package in (*PARTS, "common") for file, name in imports(package) if name == "tokenwire_cli"
    ]
    assert not wrong, wrong
    assert imports("tokenwire_cli"), "the command line composes the parts"

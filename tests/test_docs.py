"""The docs (README.md and docs/*.md) are true to the tree.

- every relative link resolves: the file, and its ``#anchor`` by GitHub's rules;
- every ``make <target>`` they name is a target of the Makefile;
- every ``tokenwire <command> --flag ...`` they name is in the real argument parser, and so is
  every ``--flag`` standing alone in inline code (a flag of another program is written with its
  program: ``llama-server --cache-ram``).

Commands are read where a reader would copy them from: inline code, shell blocks, and the lines of
other blocks typed after a ``$`` prompt (the rest of those blocks is output).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire_cli import build_parser
from tokenwire_cli.front_end import BRIDGE

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = ("bash", "sh", "shell")

FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`]+)`")
HEADING = re.compile(r"^#{1,6} +(.+?)\s*$", re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MAKE = re.compile(r"(?:^|\s)make +([\w-]+)")
TOKENWIRE = re.compile(r"(?:^|[\s/])tokenwire +([a-z][\w-]*)([^|;&#]*)")
FLAG = re.compile(r"--[a-z][\w-]*")


def prose(text: str) -> str:
    """The text outside fenced blocks, where headings and links are."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(prose(doc.read_text())):
        anchor = base = slug(heading)
        repeat = 0
        while anchor in found:  # GitHub numbers a repeated heading: name-1, name-2, ...
            repeat += 1
            anchor = f"{base}-{repeat}"
        found.add(anchor)
    return found


def code(doc: Path) -> Iterator[str]:
    """What a reader may type from a doc, a command a line (continuation lines joined)."""
    text = doc.read_text()
    for language, block in FENCE.findall(text):
        lines = block.replace("\\\n", " ").splitlines()
        if language in SHELL_BLOCKS:
            yield from lines
        else:
            yield from (line[2:] for line in lines if line.startswith("$ "))
    yield from (span.replace("\n", " ") for span in INLINE_CODE.findall(prose(text)))


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE))


def command_flags() -> dict[str, set[str]]:
    """Each ``tokenwire`` subcommand's flags, the engines' included."""
    parser = build_parser(with_engines=True)
    (subcommands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(sub._option_string_actions) for name, sub in subcommands.choices.items()}


def unknown_flags(command: str, args: str, known: dict[str, set[str]]) -> list[str]:
    if command == "front-end":  # <gateway flags> --bridge <bridge flags>
        gateway_args, _, bridge_args = args.partition(BRIDGE)
        return unknown_flags("gateway", gateway_args, known) + unknown_flags("bridge", bridge_args, known)
    return [f"tokenwire {command} {flag}" for flag in FLAG.findall(args) if flag not in known[command]]


def relative(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(INLINE_CODE.sub("", prose(doc.read_text()))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no such heading")
    assert not broken, broken


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_make_targets_exist(doc: Path) -> None:
    targets = make_targets()
    missing = [f"make {target}" for line in code(doc) for target in MAKE.findall(line) if target not in targets]
    assert not missing, missing


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_tokenwire_commands_and_flags_exist(doc: Path) -> None:
    known = command_flags()
    wrong = []
    for line in code(doc):
        for command, args in TOKENWIRE.findall(line):
            if command in known or command == "front-end":
                wrong += unknown_flags(command, args, known)
            else:
                wrong.append(f"tokenwire {command}")
        if line.startswith("--"):  # a flag standing alone is tokenwire's: some command has it
            wrong += [flag for flag in FLAG.findall(line) if not any(flag in flags for flags in known.values())]
    assert not wrong, wrong

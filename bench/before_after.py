"""The front end's CPU before and after a change: a commit's tree against this checkout, interleaved.

    .venv/bin/python -m bench.before_after --before main [--rounds 5] [--duration 8] [--warmup 2]

What the one-process front end (``tokenwire front-end``, as ``tokenwire serve`` runs it) spends
a streamed token and a non-streamed request, before a change and after it. ``--before`` names a
commit: its tree is exported (``git archive``) into a temporary folder, removed at the end. Two
stacks run side by side, each a front end over the REST section's echo chat workers (an instant
one, and a paced one making a token a millisecond), every process of a stack from one tree: the
exported one (before), and this checkout as it is, uncommitted changes included (after). Both run
on the project's ``.venv``, one interpreter and one set of dependencies: ``PYTHONPATH`` puts a
tree's folders ahead of the editable install's (and ``PYTHONSAFEPATH`` keeps the current folder
off the path), and a probe checks that tokenwire's modules load from that tree before anything is
measured.

Then, in rounds (``bench/front_ends.py``), before's window and after's (after's first every other
round): the non-streamed chat at 32 clients, then the paced stream at 8. It prints each window,
then for both loads the median front-end CPU a request and a streamed token of each (the range
over the rounds in brackets), and after against before: the ratio of the medians, and the range of
the ratios within a round. The machine is shared: each window says what share of it other
processes used. ``--before HEAD`` on a checkout without changes measures one tree against itself
(A/A): how large a difference the machine's noise alone makes.

It runs in ``bench/.venv`` (the load client), and re-executes itself there (building it the first
time). The before commit needs ``tokenwire front-end`` (since ``85226ad``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench import venv


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit (or branch, tag) before the change")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of windows, before's and after's in each (5)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds a window (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window (2)")
    return parser.parse_args(argv)


def export(commit: str, into: Path) -> None:
    """``commit``'s committed files into ``into`` (no worktree registered: nothing to clean up in git)."""
    archive = subprocess.run(["git", "archive", commit], cwd=venv.ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def tree_env(tree: Path) -> dict[str, str]:
    """What makes a part run ``tree``'s code: its folders first on the path (the stubs are in generated/).

    ``PYTHONSAFEPATH``: ``python -m`` would put the current folder (this checkout, when run from
    its root) ahead of them.
    """
    return {"PYTHONPATH": os.pathsep.join([str(tree), str(tree / "generated")]), "PYTHONSAFEPATH": "1"}


def check_loads_from(tree: Path, env: dict[str, str]) -> None:
    """Fail unless tokenwire's packages and generated modules load from ``tree`` under ``env``."""
    generated = sorted(f"tokenwire.v1.{path.stem}" for path in (tree / "generated/tokenwire/v1").glob("*.py"))
    modules = ["common", "gateway", "workers", "rest_bridge", "tokenwire_cli", *generated]
    code = "import importlib, sys\nfor name in sys.argv[1:]: print(importlib.import_module(name).__file__)"
    found = subprocess.run(
        [str(venv.PROJECT_PYTHON), "-c", code, *modules],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    strays = [path for path in found if not Path(path).resolve().is_relative_to(tree.resolve())]
    if strays or len(found) != len(modules):
        sys.exit(f"with {env} tokenwire does not load from {tree} alone: {strays or found}")


async def compare(envs: dict[str, dict[str, str]], args: argparse.Namespace) -> None:
    from bench import front_ends
    from bench.servers import Group

    with Group() as group:
        stacks = {name: front_ends.start(group, name, front_ends.echo_workers(), env=env) for name, env in envs.items()}
        figures = await front_ends.measure_ceiling(group, stacks, args.rounds, args.duration, args.warmup)
    front_ends.print_summary(figures, list(stacks))


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)  # --help before any install
    venv.run_inside("bench.before_after", argv)
    commit = subprocess.check_output(
        ["git", "rev-parse", "--short", "--verify", f"{args.before}^{{commit}}"], cwd=venv.ROOT, text=True
    ).strip()
    with tempfile.TemporaryDirectory(prefix=f"tokenwire-{commit}-") as folder:
        trees = {"before": Path(folder), "after": venv.ROOT}
        export(commit, trees["before"])
        envs = {name: tree_env(tree) for name, tree in trees.items()}
        for name, tree in trees.items():
            check_loads_from(tree, envs[name])
        print(f"before: {commit}, exported into {trees['before']}; after: this checkout, {venv.ROOT}", flush=True)
        asyncio.run(compare(envs, args))


if __name__ == "__main__":
    main()

"""The locks in deps/ still satisfy what the project declares (make lock rewrites them).

A dependency added to pyproject.toml (or a range changed) without `make lock` fails here, before
a new machine would install something the lock never recorded. The code generators are pinned
exactly, so generated/ is a function of the lock (tests/test_generated.py checks the bytes).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DEPS = ROOT / "deps"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^ \\]+)")
RUNTIME_EXTRAS = ("embeddings", "llama", "tracing")


def pins(lock: str) -> dict[str, Version]:
    """name -> version of every package a lock pins, each with at least one hash."""
    text = (DEPS / lock).read_text()
    found: dict[str, Version] = {}
    for entry in re.split(r"\n(?=\S)", text):
        match = PIN.match(entry)
        if match:
            assert "--hash=sha256:" in entry, f"{lock}: {match[1]} has no hash"
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def requirements(source: str) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in (DEPS / source).read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def declared(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    return [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]
    ]


def unsatisfied(wanted: list[Requirement], lock: str) -> list[str]:
    locked = pins(lock)
    missing = []
    for requirement in wanted:
        version = locked.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(f"{requirement} (locked: {version})")
    return missing


def test_runtime_lock_satisfies_pyproject() -> None:
    assert not unsatisfied(declared(*RUNTIME_EXTRAS), "runtime.lock"), "run `make lock`"


def test_dev_lock_satisfies_pyproject() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not unsatisfied(declared(*extras), "dev.lock"), "run `make lock`"


def test_tools_lock_satisfies_tools_in_and_the_build_backend() -> None:
    build_requires = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert not unsatisfied(requirements("tools.in") + build_requires, "tools.lock"), "run `make lock`"


def test_models_and_bench_locks_satisfy_their_inputs() -> None:
    assert not unsatisfied(requirements("models.in"), "models.lock"), "run `make lock`"
    assert not unsatisfied(requirements("bench.in"), "bench.lock"), "run `make lock`"


def test_a_package_has_one_version_in_every_project_venv() -> None:
    tools, runtime, dev = pins("tools.lock"), pins("runtime.lock"), pins("dev.lock")
    assert set(runtime) <= set(dev), "dev.lock must hold everything runtime.lock does"
    clashes = {
        name: versions
        for name in set(tools) | set(runtime) | set(dev)
        if len(versions := {lock[name] for lock in (tools, runtime, dev) if name in lock}) > 1
    }
    assert not clashes, f"run `make lock`: {clashes}"
    # The bench's load client imports the generated code: same grpcio and protobuf.
    bench = pins("bench.lock")
    assert {n: bench[n] for n in ("grpcio", "protobuf")} == {n: runtime[n] for n in ("grpcio", "protobuf")}


def test_the_generated_code_needs_no_more_than_pyproject_admits() -> None:
    """A library user who installs tokenwire with pyproject's ranges can import generated/."""
    stub = (ROOT / "generated/tokenwire/v1/api_pb2_grpc.py").read_text()
    grpc_generated = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub)[1])  # type: ignore[index]
    message = (ROOT / "generated/tokenwire/v1/api_pb2.py").read_text()
    protobuf_generated = Version(re.search(r"# Protobuf Python Version: (\S+)", message)[1])  # type: ignore[index]
    floors = {r.name: r.specifier for r in declared()}
    assert all(Version(s.version) >= grpc_generated for s in floors["grpcio"] if s.operator == ">="), floors
    assert all(Version(s.version) >= protobuf_generated for s in floors["protobuf"] if s.operator == ">="), floors
    # ... and the locked generator is the one that wrote it.
    assert pins("dev.lock")["grpcio-tools"] == grpc_generated


def test_the_code_generators_are_pinned_exactly_and_installed_as_locked() -> None:
    dev = pins("dev.lock")
    exact = {r.name: r for r in declared("dev")}
    for name in ("grpcio-tools", "mypy-protobuf", "buf-bin"):
        assert [s.operator for s in exact[name].specifier] == ["=="], f"pin {name} exactly in pyproject.toml"
        # A venv installed from an older lock writes other bytes: reinstall before blaming the drift test.
        installed = Version(importlib.metadata.version(name))
        assert installed == dev[name], f"{name} {installed} is installed, the lock says {dev[name]}: `make install`"

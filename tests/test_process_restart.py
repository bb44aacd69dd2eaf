"""A worker restarting itself with the environment its engine needs (llama_cpp: huge pages).

``settings.restart_with`` is run in a real child process; the llama_cpp engine's choice of
environment against a kernel that gives huge pages on request, always or never; a real llama_cpp
worker restarts before it reads its cluster token from a pipe that gives it once. That the real
worker's KV cache ends up in huge pages is in ``tests/test_batching.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests import harness
from workers.engines import llama_cpp
from workers.engines.llama_cpp import loading

TOKEN = "restart-test-cluster-token-0123456789abcdef"

RESTARTING = """
import json, os, sys
from common import settings
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "value": os.environ.get("TW_TEST_VALUE")}), flush=True)
settings.restart_with({"TW_TEST_VALUE": "1"})
"""


def test_restart_with_runs_the_same_command_again_once_in_the_same_process(tmp_path: Path) -> None:
    script = tmp_path / "restarting.py"
    script.write_text(RESTARTING)
    done = subprocess.run(
        [sys.executable, str(script), "--flag", "a b"], capture_output=True, text=True, timeout=60, check=True
    )
    runs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["value"] for r in runs] == [None, "1"]  # restarted once, then left alone
    assert runs[0]["pid"] == runs[1]["pid"]  # exec: a supervisor still sees its child
    assert runs[0]["argv"] == runs[1]["argv"] == ["--flag", "a b"]


@pytest.fixture
def thp_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def set_mode(text: str | None) -> None:
        path = tmp_path / "enabled"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        monkeypatch.setattr(loading, "THP_MODE", path)

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return set_mode


def test_llama_cpp_asks_for_huge_pages_where_the_kernel_gives_them_on_request(
    thp_mode, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    args = argparse.Namespace(no_huge_pages=False)
    thp_mode("always [madvise] never\n")
    assert llama_cpp.process_environment(args) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables the operator set stay, beside it.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert llama_cpp.process_environment(args) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}


def test_llama_cpp_leaves_the_environment_alone_otherwise(thp_mode, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    thp_mode("always [madvise] never\n")
    assert llama_cpp.process_environment(argparse.Namespace(no_huge_pages=True)) == {}
    args = argparse.Namespace(no_huge_pages=False)
    for mode in ("[always] madvise never\n", "always madvise [never]\n", None):  # all memory, none, no THP
        thp_mode(mode)
        assert llama_cpp.process_environment(args) == {}
    thp_mode("always [madvise] never\n")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the operator's own choice
    assert llama_cpp.process_environment(args) == {}


@pytest.mark.models
def test_a_llama_worker_restarts_before_it_reads_a_token_file_that_gives_its_secret_once(tmp_path: Path) -> None:
    """``--cluster-token-file`` from a pipe (``<(vault read ...)``): read after the restart, once."""
    if not loading._thp_on_request():
        pytest.skip("no restart here: this kernel gives transparent huge pages to all memory or to none")
    fifo = tmp_path / "token"
    os.mkfifo(fifo)

    def give_once() -> None:
        with fifo.open("w") as pipe:  # blocks until the worker opens it
            pipe.write(TOKEN + "\n")

    writer = threading.Thread(target=give_once, daemon=True)
    writer.start()
    gateway = harness.gateway(env={"TOKENWIRE_CLUSTER_TOKEN": TOKEN})
    try:
        worker = harness.worker(
            gateway.address, "--engine", "llama_cpp", "--n-ctx", "512", "--cluster-token-file", str(fifo)
        )
        try:
            assert worker.process is not None
            environ = Path(f"/proc/{worker.process.pid}/environ").read_bytes().split(b"\0")
            assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ  # it did restart
            assert harness.worker_stats(worker.address, TOKEN).running_sequences == 0  # with the token
        finally:
            worker.stop()
    finally:
        gateway.stop()
    writer.join(timeout=5)
    assert not writer.is_alive()

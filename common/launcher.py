"""A server as a child process: start it, read its READY line, stop it.

Every tokenwire server prints ``READY <part> <host>:<port>`` on stdout once it
serves (``common/settings.py``); a gateway also prints ``REGISTRY <host>:<port>``
and a part with ``--metrics-port`` ``METRICS <host>:<port>``. ``tokenwire serve``
(``tokenwire_cli/supervisor.py``), the tests (``tests/harness.py``) and the
benchmark (``bench/servers.py``) start their processes with :class:`Launched`;
each keeps its own timeouts, logs and error messages.

Standard library only: the benchmark's own venv (FastChat's, without tokenwire)
reads this file in place.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

# The lines a server announces itself with: the word, then an address last.
MARKERS = ("READY", "REGISTRY", "METRICS")


class NotReady(Exception):
    """The process did not print READY: ``reason`` is "exited", "timeout" or "stopped"."""

    def __init__(self, reason: str, returncode: int | None = None) -> None:
        super().__init__(reason if returncode is None else f"{reason} ({returncode})")
        self.reason = reason
        self.returncode = returncode


def die_with_parent() -> None:
    """Linux, in the child before exec: SIGTERM it when its parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Launched:
    """One child process, in a session of its own, with its stdout read line by line.

    ``stderr``: a path (a log file, opened here), ``subprocess.STDOUT`` (stderr
    read with stdout) or None (this process's stderr). ``on_line`` sees every
    stdout line, markers too. ``env`` is the whole environment (default: this
    process's), with PYTHONUNBUFFERED=1: a READY line must not wait in a buffer.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stderr: Path | int | None = None,
        on_line: Callable[[str], Any] | None = None,
        with_parent: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        self.stderr = stderr
        self.on_line = on_line
        self.with_parent = with_parent  # dies with this process (serve's parts)
        self.process: subprocess.Popen[str] | None = None
        self.log_file: IO[str] | None = None
        # The latest address of each marker seen (kept over a restart until the new one prints it).
        self.announced: dict[str, str] = {}
        self.ready = threading.Event()

    def start(self) -> Launched:
        """Start (or start again); returns at once: :meth:`wait_ready` waits for READY."""
        self.ready.clear()
        stderr: IO[str] | int | None
        if isinstance(self.stderr, Path):
            self.log_file = stderr = open(self.stderr, "w")  # closed by stop()
        else:
            stderr = self.stderr
        # A session of its own: a terminal's Ctrl-C reaches only the parent, which stops it.
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=die_with_parent if self.with_parent else None,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            word, _, rest = line.partition(" ")
            if word in MARKERS and rest.strip():
                fields = line.split()
                self.announced[word] = fields[-1]
                if word == "READY":
                    if len(fields) == 3:  # READY <part> <address>: one process may hold two parts
                        self.announced[f"READY {fields[1]}"] = fields[-1]
                    self.ready.set()
            if self.on_line is not None:
                self.on_line(line)

    @property
    def address(self) -> str:
        """The address on the last READY line."""
        return self.announced.get("READY", "")

    def part_address(self, part: str) -> str:
        """The address ``part`` announced (``READY <part> <address>``), or "" before it did."""
        return self.announced.get(f"READY {part}", "")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(
        self,
        timeout: float,
        *,
        until: Callable[[], bool] | None = None,
        stopping: Callable[[], bool] | None = None,
        poll: float = 0.1,
    ) -> None:
        """Until the READY line (or ``until()``, for servers that print none); else NotReady:
        stopping() said so, the process exited, or ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        while not (until() if until is not None else self.ready.wait(poll)):
            if stopping is not None and stopping():
                raise NotReady("stopped")
            if not self.alive():
                assert self.process is not None
                raise NotReady("exited", self.process.poll())
            if time.monotonic() > deadline:
                raise NotReady("timeout")
            if until is not None:
                time.sleep(poll)

    def send_signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float, sig: int = signal.SIGTERM, kill_group: bool = False) -> int | None:
        """``sig``, then SIGKILL (to its whole session with ``kill_group``) after ``timeout``
        seconds; closes the log. The exit status, None if it never started."""
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                if kill_group:
                    os.killpg(self.process.pid, signal.SIGKILL)
                else:
                    self.process.kill()
                self.process.wait()
        if self.log_file is not None:
            self.log_file.close()
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

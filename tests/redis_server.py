"""A real Redis for the tests: Debian's redis-server (``make redis`` installs it), on a free
port of 127.0.0.1, its files in a temporary directory; killed, paused and restarted by the
tests of the store's failures. Its append-only file is written at every command, so what a
killed Redis had acknowledged is there again after a restart."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests import harness

REDIS_SERVER = "/usr/bin/redis-server"


def _free_port() -> int:
    # Redis takes no port 0 (it means "no TCP"): ask the kernel for a free one, then give it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, with or without a password
    except OSError:
        return False


class RedisServer:
    def __init__(self) -> None:
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError(f"{REDIS_SERVER} is missing: `make redis` installs Debian's redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix="tokenwire-redis-"))
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--logfile", "redis.log"]
        if self.password:
            argv += ["--requirepass", self.password]  # in its argv: a test's throwaway
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        harness.wait_until(lambda: _answers(self.port) or self.process.poll() is not None, what="redis-server up")
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{self.log()}")
        return self

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: gone without a word, its port refusing connections."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: its port still accepts connections, nothing answers (a hung store)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def restart_with_password(self, password: str) -> None:
        self.password = password
        self.restart()

    def command(self, password: str | None, *command: str) -> str:
        """One command's reply, by redis-cli (as an operator would look)."""
        argv = ["redis-cli", "-p", str(self.port), "--no-auth-warning", *(["-a", password] if password else [])]
        return subprocess.run([*argv, *command], capture_output=True, text=True, check=True).stdout.strip()

    def keys(self, password: str | None = None) -> list[str]:
        """Every key it holds."""
        return self.command(password, "--scan").split()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

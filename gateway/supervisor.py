"""``tokenwire serve``: the whole system on one machine, as child processes.

Starts the gateway (with its registry), one worker per default model and the
REST bridge, each as its own process (so they use separate cores), waits
until the models answer, prints how to reach them, and stops everything
cleanly on Ctrl-C / SIGTERM. API keys reach the children through the
environment, never their command lines.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

READY_TIMEOUT = 600.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[str] | None = None
    address: str = ""
    ready: threading.Event = field(default_factory=threading.Event)

    def start(self, env: dict[str, str]) -> None:
        # A session of its own: Ctrl-C in the terminal reaches only the
        # supervisor, which stops the parts in order; and a part dies with it.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *self.argv],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("READY "):
                self.address = line.split()[-1]
                self.ready.set()
            else:
                sys.stdout.write(line)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _die_with_parent() -> None:
    """Linux: SIGTERM this child when the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _Stop:
    """Set by SIGINT/SIGTERM. A plain flag: a signal handler must not take the
    lock that a threading.Event.wait in the same thread may hold."""

    requested = False


def _on_signal(signum: int, frame: object) -> None:
    _Stop.requested = True


def _say(message: str) -> None:
    print(f"[tokenwire] {message}", flush=True)


def _wait_ready(children: list[Child], deadline: float) -> None:
    for child in children:
        while not child.ready.wait(0.2):
            if _Stop.requested:
                raise SystemExit("stopped while starting")
            if not child.alive():
                raise SystemExit(f"{child.name} exited before it was ready (see its log above)")
            if time.monotonic() > deadline:
                raise SystemExit(f"{child.name} was not ready within {READY_TIMEOUT:.0f} s")


def _wait_models(url: str, models: list[str], key: str | None, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    while time.monotonic() < deadline and not _Stop.requested:
        try:
            served = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=headers, timeout=2).json()["data"]}
            if set(models) <= served:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit("stopped while starting" if _Stop.requested else f"the models {models} did not register in time")


def _banner(http: str, grpc_address: str, chat_model: str, embed_model: str | None, keys: bool) -> str:
    url = f"http://{http}"
    auth = ' -H "Authorization: Bearer $TOKENWIRE_API_KEY"' if keys else ""
    grpc_auth = ' -H "authorization: Bearer $TOKENWIRE_API_KEY"' if keys else ""
    lines = [
        "",
        "tokenwire is ready.",
        f"  OpenAI REST API  {url}/v1   (docs: {url}/docs)",
        f"  gRPC gateway     {grpc_address}  (reflection on; service tokenwire.v1.InferenceService)",
        f"  models           {chat_model}" + (f", {embed_model}" if embed_model else ""),
        "",
        "Try it:",
        f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f'    -d \'{{"model": "{chat_model}", "messages": [{{"role": "user", "content": "What is the capital of France? Answer in one sentence."}}], "temperature": 0}}\'',
        "",
        "  python -c 'from openai import OpenAI; import os",
        f'  c = OpenAI(base_url="{url}/v1", api_key=os.environ.get("TOKENWIRE_API_KEY", "none"))',
        f'  print(c.chat.completions.create(model="{chat_model}", messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)\'',
        "",
        f'  grpcurl -plaintext{grpc_auth} -d \'{{"model": "{chat_model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}\' \\',
        f"    {grpc_address} tokenwire.v1.InferenceService/CreateChatCompletion",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def _models(args: argparse.Namespace) -> tuple[str, list[str], str | None, list[str]]:
    """(chat model, chat worker flags, embedding model, embedding worker flags)."""
    if args.echo:
        return (
            "echo-chat",
            ["--engine", "echo", "--model-name", "echo-chat"],
            "echo-embedding",
            ["--engine", "echo", "--echo-kind", "embedding", "--model-name", "echo-embedding"],
        )
    chat_model, chat = "smollm2-135m-instruct", ["--engine", "llama_cpp"]
    if args.chat_model_path:
        chat_model = os.path.splitext(os.path.basename(args.chat_model_path))[0].lower()
        chat += ["--model-path", args.chat_model_path, "--model-name", chat_model]
    # Concurrent embedding requests share forward passes: let them in together.
    embed_model, embed = "all-minilm-l6-v2", ["--engine", "embeddings", "--limit-worker-concurrency", "32"]
    if args.embedding_model_path:
        embed_model = os.path.basename(os.path.normpath(args.embedding_model_path)).lower()
        embed += ["--model-path", args.embedding_model_path, "--model-name", embed_model]
    return chat_model, chat, embed_model, embed


def serve(args: argparse.Namespace) -> None:
    from gateway.cli import api_keys

    keys = [spec.key for spec in api_keys(args)]
    env = dict(os.environ)
    # The children read the same settings from the environment, never argv (ps shows argv).
    env["TOKENWIRE_API_KEYS"] = args.api_keys or ""
    env["TOKENWIRE_API_KEYS_FILE"] = os.path.abspath(args.api_keys_file) if args.api_keys_file else ""
    for name in ("rate_limit_rpm", "rate_limit_tpm"):
        value = getattr(args, name)
        env.pop(f"TOKENWIRE_{name.upper()}", None)
        if value is not None:
            env[f"TOKENWIRE_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    common = [
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
        "--shutdown-grace",
        str(args.shutdown_grace),
    ]
    chat_model, chat_flags, embed_model, embed_flags = _models(args)
    if args.no_embeddings:
        embed_model = None

    expected = ",".join(m for m in (chat_model, embed_model) if m)
    gateway_argv = ["gateway", "--host", args.host, "--port", str(args.grpc_port), "--expect-models", expected, *common]
    if args.controller_address:
        gateway_argv += ["--controller-address", args.controller_address]
    gateway = Child("gateway", gateway_argv)
    workers: list[Child] = []
    bridge: Child | None = None

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    deadline = time.monotonic() + READY_TIMEOUT
    exit_code = 0
    try:
        _say(f"starting the gateway on {args.host}:{args.grpc_port}")
        gateway.start(env)
        _wait_ready([gateway], deadline)
        grpc_address = gateway.address
        local_grpc = "127.0.0.1:" + grpc_address.rsplit(":", 1)[1] if args.host in ("0.0.0.0", "::") else grpc_address
        registry = args.controller_address or local_grpc
        worker_common = ["worker", "--host", "127.0.0.1", "--port", "0", "--controller-address", registry, *common]
        workers = [Child("chat worker", [*worker_common, *chat_flags])]
        if embed_model:
            workers.append(Child("embedding worker", [*worker_common, *embed_flags]))
        bridge = Child(
            "bridge",
            [
                "bridge",
                "--host", args.host,
                "--port", str(args.port),
                "--gateway-address", local_grpc,
                "--allowed-origins", args.allowed_origins,
                "--allowed-methods", args.allowed_methods,
                "--allowed-headers", args.allowed_headers,
                "--max-body-bytes", str(args.max_body_bytes),
                "--responses-store-size", str(args.responses_store_size),
                "--responses-store-bytes", str(args.responses_store_bytes),
                *(["--allow-credentials"] if args.allow_credentials else []),
                *common,
            ],
        )  # fmt: skip
        _say("starting the workers: loading " + ", ".join(m for m in (chat_model, embed_model) if m))
        for worker in workers:
            worker.start(env)
        _say(f"starting the REST bridge on {args.host}:{args.port}")
        bridge.start(env)
        _wait_ready([*workers, bridge], deadline)
        http = bridge.address
        local_http = "127.0.0.1:" + http.rsplit(":", 1)[1] if args.host in ("0.0.0.0", "::") else http
        _wait_models(
            f"http://{local_http}", [m for m in (chat_model, embed_model) if m], keys[0] if keys else None, deadline
        )
        print(_banner(http, grpc_address, chat_model, embed_model, bool(keys)), flush=True)
        children = [gateway, *workers, bridge]
        while not _Stop.requested:
            time.sleep(0.2)
            dead = [c.name for c in children if not c.alive()]
            if dead:
                _say(f"{', '.join(dead)} stopped unexpectedly; shutting down")
                exit_code = 1
                break
    except SystemExit as error:
        _say(str(error))
        exit_code = 0 if _Stop.requested else 1
    finally:
        _say("stopping")
        # Front to back: no new requests, workers leave the registry, then the gateway.
        for child in [bridge, *workers, gateway]:
            if child is not None:
                child.stop(args.shutdown_grace + 5)
        _say("stopped")
    sys.exit(exit_code)

"""What `tokenwire serve` runs, read from its plan without starting a process: each child's
command line and environment, parsed as the child itself parses them."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from unittest import mock

import pytest

from common import settings
from tokenwire_cli import build_parser, plan
from tokenwire_cli.front_end import BRIDGE
from workers import command as worker_command

TOKEN = "cluster-token-for-the-plan-0123456789"
ENVIRON = {"PATH": os.environ.get("PATH", ""), "TOKENWIRE_CLUSTER_TOKEN_FILE": "/somewhere/else"}
# A value other than its default for every bridge flag serve accepts (FastChat's JSON list among them).
BRIDGE_FLAGS = {
    "--host": "127.0.0.2",
    "--port": "8123",
    "--shutdown-grace": "3.5",
    "--allow-credentials": None,
    "--allowed-origins": '["http://a.example", "http://b.example"]',
    "--allowed-methods": "GET,POST",
    "--allowed-headers": "X-Custom",
    "--max-body-bytes": "123456",
    "--request-read-timeout": "2.5",
    "--max-connections": "77",
    "--sse-keepalive-interval": "4",
    "--responses-store-size": "9",
    "--responses-store-bytes": "99999",
    "--max-n": "3",
    "--max-tokens-limit": "4096",
    "--log-level": "debug",
    "--log-format": "json",
}
GATEWAY_FLAGS = {
    "--grpc-port": "50999",
    "--registry-port": "41000",
    "--heartbeat-expiry": "7.5",
    "--max-receive-message-length": "2000000",
    "--max-send-message-length": "3000000",
    "--api-keys": "sk-one-secret,sk-two-secret",
    "--api-keys-file": "keys.txt",
    "--rate-limit-rpm": "60",
    "--rate-limit-tpm": "6000",
}


def argv(flags: dict[str, str | None]) -> list[str]:
    return [item for flag, value in flags.items() for item in (flag, value) if item is not None]


def serve_args(*flags: str) -> argparse.Namespace:
    """serve's flags as serve reads them (FastChat's forms normalised)."""
    args = build_parser(with_engines=False).parse_args(["serve", *flags])
    settings.check_flag_forms(args)
    return args


def make_plan(*flags: str, ports: plan.Ports | None = None) -> plan.Plan:
    args = serve_args(*flags)
    return plan.plan(args, TOKEN, ENVIRON, ports or plan.Ports.asked(args))


def parts(process: plan.Process) -> dict[str, list[str]]:
    """The parts a process runs, and each one's flags (the front end: the gateway's, then the bridge's)."""
    command, *rest = process.argv
    if command != "front-end":
        return {command: rest}
    cut = rest.index(BRIDGE)
    return {"gateway": rest[:cut], "bridge": rest[cut + 1 :]}


def child_view(process: plan.Process, part: str) -> argparse.Namespace:
    """A part's settings as its process reads them: its flags over its environment."""
    with mock.patch.dict(os.environ, process.env, clear=True):
        args = build_parser(with_engines=part == "worker").parse_args([part, *parts(process)[part]])
    settings.check_flag_forms(args)
    return args


def dests(part: str) -> set[str]:
    """The settings a part's flags give."""
    return set(vars(build_parser(with_engines=False).parse_args([part]))) - {"command", "func", "process_environment"}


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "split"])
def test_every_bridge_flag_serve_accepts_reaches_the_bridge(split: bool) -> None:
    shared = dests("serve") & dests("bridge")
    assert shared == {flag.removeprefix("--").replace("-", "_") for flag in BRIDGE_FLAGS}, "give each a value here"
    given = serve_args(*argv(BRIDGE_FLAGS))
    planned = make_plan(*argv(BRIDGE_FLAGS), *(["--split-front-end"] if split else []))
    bridge = child_view(planned.bridge or planned.front, "bridge")
    assert {dest: getattr(bridge, dest) for dest in shared} == {dest: getattr(given, dest) for dest in shared}
    assert settings.list_flag(bridge.allowed_origins, "--allowed-origins") == ["http://a.example", "http://b.example"]


def test_every_gateway_flag_serve_accepts_reaches_the_gateway() -> None:
    given = serve_args(*argv(GATEWAY_FLAGS), *argv(BRIDGE_FLAGS))
    planned = make_plan(*argv(GATEWAY_FLAGS), *argv(BRIDGE_FLAGS))
    gateway = child_view(planned.front, "gateway")
    settled_by_serve = {"port", "expect_models", "cluster_token", "cluster_token_file"}
    shared = (dests("serve") & dests("gateway")) - settled_by_serve
    assert {dest: getattr(gateway, dest) for dest in shared} == {dest: getattr(given, dest) for dest in shared}
    assert gateway.port == 50999 and gateway.registry_port == 41000
    assert gateway.expect_models == "smollm2-135m-instruct,all-minilm-l6-v2"
    assert (gateway.cluster_token, gateway.cluster_token_file) == (TOKEN, None)


def test_the_message_limits_follow_the_body_limit_unless_given() -> None:
    planned = make_plan("--max-body-bytes", "123456")
    for process, part in ((planned.front, "gateway"), *((worker, "worker") for worker in planned.workers)):
        args = child_view(process, part)
        assert (args.max_receive_message_length, args.max_send_message_length) == (123456, 123456)


def test_secrets_go_by_the_environment_never_argv() -> None:
    planned = make_plan(*argv(GATEWAY_FLAGS), "--split-front-end")
    processes = [planned.front, *filter(None, [planned.bridge]), *planned.workers]
    secrets = ("sk-one-secret", "sk-two-secret", "keys.txt", TOKEN)
    assert not [arg for process in processes for arg in process.argv if any(s in arg for s in secrets)]
    gateway = child_view(planned.front, "gateway")
    assert (gateway.api_keys, gateway.api_keys_file) == ("sk-one-secret,sk-two-secret", "keys.txt")
    assert (gateway.rate_limit_rpm, gateway.rate_limit_tpm) == (60, 6000)
    for worker in planned.workers:
        assert child_view(worker, "worker").cluster_token == TOKEN
    # The token serve gives, not a file serve was given: the file is not passed on to a member.
    assert all("TOKENWIRE_CLUSTER_TOKEN_FILE" not in p.env for p in [planned.front, *planned.workers])


def test_split_front_end_gives_two_processes_and_the_default_one() -> None:
    one = make_plan()
    assert one.front.argv[0] == "front-end" and one.bridge is None
    assert set(parts(one.front)) == {"gateway", "bridge"}
    assert "gateway_address" not in {a.split("=")[0] for a in parts(one.front)["bridge"]}  # its own gateway
    split = make_plan("--split-front-end", ports=plan.Ports(grpc=50999, registry=41000, http=8111))
    assert split.bridge is not None
    assert (split.front.argv[0], split.bridge.argv[0]) == ("gateway", "bridge")
    assert child_view(split.bridge, "bridge").gateway_address == "127.0.0.1:50999"


def test_a_controller_address_means_no_registry_port() -> None:
    # FastChat's form of the address, a URL.
    planned = make_plan("--controller-address", "http://localhost:21001", "--echo")
    gateway = child_view(planned.front, "gateway")
    assert (gateway.controller_address, gateway.registry_port) == ("localhost:21001", None)
    assert planned.registry == "localhost:21001"
    assert {child_view(worker, "worker").controller_address for worker in planned.workers} == {"localhost:21001"}


def test_the_workers_dial_the_gateways_registry_on_loopback() -> None:
    planned = make_plan("--host", "0.0.0.0", "--echo", ports=plan.Ports(grpc=50999, registry=41000, http=8111))
    assert child_view(planned.front, "gateway").registry_port == 41000
    for worker in planned.workers:
        args = child_view(worker, "worker")
        assert (args.host, args.port, args.controller_address) == ("127.0.0.1", 0, "127.0.0.1:41000")


def test_the_bound_ports_are_the_ports_to_restart_on() -> None:
    planned = make_plan("--port", "0", "--grpc-port", "0", ports=plan.Ports(grpc=50999, registry=41000, http=8111))
    gateway, bridge = child_view(planned.front, "gateway"), child_view(planned.front, "bridge")
    assert (gateway.port, gateway.registry_port, bridge.port) == (50999, 41000, 8111)


def test_workers_per_model() -> None:
    echo = make_plan("--echo")
    assert echo.models == ("echo-chat", "echo-embedding")
    assert [child_view(w, "worker").echo_kind for w in echo.workers] == ["chat", "embedding"]
    assert [w.name for w in make_plan("--no-embeddings").workers] == ["chat worker"]
    assert make_plan("--no-embeddings").models == ("smollm2-135m-instruct",)


@pytest.mark.parametrize("custom", [False, True], ids=["embedded models", "model paths"])
def test_serve_and_worker_name_one_model_file_the_same(custom: bool, tmp_path: Path) -> None:
    """The name serve waits for is the name the worker serves, whoever starts the worker."""
    flags = []
    if custom:
        gguf = tmp_path / "Tiny-Chat-1B.Q4_K_M.gguf"
        gguf.write_bytes(b"")  # named, not loaded
        folder = tmp_path / "Mini-Embedder.v2"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
        flags = ["--chat-model-path", str(gguf), "--embedding-model-path", f"{folder}/"]
    planned = make_plan(*flags)
    served = []
    for worker in planned.workers:
        args = child_view(worker, "worker")
        served.append(importlib.import_module(worker_command.ENGINES[args.engine]).build(args).info.name)
    assert tuple(served) == planned.models
    if custom:  # a model file's own name, its case kept, as `tokenwire worker` always named it
        assert planned.models == ("Tiny-Chat-1B.Q4_K_M", "Mini-Embedder.v2")
    else:
        assert planned.models == ("smollm2-135m-instruct", "all-minilm-l6-v2")

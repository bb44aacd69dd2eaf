"""What ``tokenwire serve`` runs: each process, its command line and its environment.

:func:`plan` is a pure function of serve's parsed flags; ``supervisor.py`` carries the plan out
(starts it, waits for READY, restarts, stops). A serve flag reaches every part that declares a
flag of the same name, with its value: the parts' own declarations (``gateway.command``,
``rest_bridge.command``, ``workers.command``) say which, so no flag is written twice. Secrets go
by the environment (``TOKENWIRE_<FLAG>``), never a command line: ps shows command lines.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from common import addresses, settings
from gateway import command as gateway_command
from rest_bridge import command as bridge_command
from tokenwire_cli.front_end import BRIDGE
from workers import command as worker_command
from workers.model_names import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, model_name_for

# The API keys and their limits travel together, with the cluster token, by the environment.
BY_ENVIRONMENT = (
    "api_keys",
    "api_keys_file",
    "rate_limit_rpm",
    "rate_limit_tpm",
    "cluster_token",
    "cluster_token_file",
)

Declare = Callable[[argparse.ArgumentParser], None]
Part = tuple[Declare, Mapping[str, Any]]  # a part's flag declarations, and the values to give them


@dataclass(frozen=True)
class Ports:
    """The front end's ports (0: any free one). A plan made with the ports it bound is the one to
    restart with: a restarted part comes back on the same ports."""

    grpc: int
    registry: int  # the gateway's own registry (none with --controller-address)
    http: int

    @classmethod
    def asked(cls, args: argparse.Namespace) -> Ports:
        return cls(grpc=args.grpc_port, registry=args.registry_port, http=args.port)


@dataclass(frozen=True)
class Process:
    """One child: ``python -m tokenwire_cli <argv>``, with ``env`` as its whole environment."""

    name: str  # as serve's messages name it
    argv: tuple[str, ...]
    env: Mapping[str, str]


@dataclass(frozen=True)
class Plan:
    front: Process  # the gateway and the bridge in one process, or (--split-front-end) the gateway
    bridge: Process | None  # --split-front-end: the bridge, which dials the gateway's port
    workers: tuple[Process, ...]  # they register at the registry's port
    models: tuple[str, ...]  # the chat model, then the embedding model if any: what must answer
    registry: str  # where the parts on this machine reach the registry


def plan(args: argparse.Namespace, cluster_token: str, environ: Mapping[str, str], ports: Ports) -> Plan:
    """What serve runs for ``args``; ``environ`` is serve's own environment, which the children inherit."""
    serve = {**vars(args), "cluster_token": cluster_token, "cluster_token_file": None}
    # What the bridge accepts as a body must also get through the gateway and the workers.
    message_limits = {
        "max_receive_message_length": args.max_receive_message_length or args.max_body_bytes,
        "max_send_message_length": args.max_send_message_length or args.max_body_bytes,
    }
    workers = _workers(args)
    models = tuple(worker.model for worker in workers)
    gateway = {
        **serve,
        **message_limits,
        "port": ports.grpc,
        "expect_models": ",".join(models),
        # The registry on a port of its own: the public port carries only the public API.
        "registry_port": None if args.controller_address else ports.registry,
    }
    # No --gateway-address in one process: the front end gives the bridge its own gateway.
    bridge = {**serve, "port": ports.http}
    split_bridge: Process | None = None
    if args.split_front_end:
        front = _process("gateway", "gateway", [(gateway_command.gateway_flags, gateway)], environ)
        dialing = {**bridge, "gateway_address": addresses.local(args.host, ports.grpc)}
        split_bridge = _process("bridge", "bridge", [(bridge_command.bridge_flags, dialing)], environ)
    else:
        parts = [(gateway_command.gateway_flags, gateway), (bridge_command.bridge_flags, bridge)]
        front = _process("front end", "front-end", parts, environ)
    registry = args.controller_address or addresses.local(args.host, ports.registry)
    worker_flags = {**serve, **message_limits, "host": "127.0.0.1", "port": 0, "controller_address": registry}
    return Plan(
        front=front,
        bridge=split_bridge,
        workers=tuple(
            _process(w.name, "worker", [(_worker_flags, {**worker_flags, **w.flags})], environ, w.engine_flags)
            for w in workers
        ),
        models=models,
        registry=registry,
    )


class _Worker(NamedTuple):
    name: str  # the process's
    model: str
    flags: dict[str, Any]  # the worker's
    engine_flags: tuple[str, ...] = ()  # its engine's own, as argv: serve does not import the engines


def _workers(args: argparse.Namespace) -> list[_Worker]:
    if args.echo:
        chat = _Worker("chat worker", "echo-chat", {"engine": "echo", "model_name": "echo-chat"})
        embedding = _Worker(
            "embedding worker",
            "echo-embedding",
            {"engine": "echo", "model_name": "echo-embedding"},
            ("--echo-kind", "embedding"),
        )
    else:
        # No --model-name: the worker names its model by the rule serve expects it by (model_names.py).
        chat_path, embedding_path = args.chat_model_path, args.embedding_model_path
        chat = _Worker(
            "chat worker",
            model_name_for(chat_path) if chat_path else DEFAULT_CHAT_MODEL,
            {"engine": "llama_cpp", "model_path": chat_path or None},
        )
        embedding = _Worker(
            "embedding worker",
            model_name_for(embedding_path) if embedding_path else DEFAULT_EMBEDDING_MODEL,
            # Concurrent embedding requests share forward passes: let them in together.
            {"engine": "embeddings", "model_path": embedding_path or None, "limit_worker_concurrency": 32},
        )
    return [chat] if args.no_embeddings else [chat, embedding]


def _worker_flags(parser: argparse.ArgumentParser) -> None:
    """A worker's own flags, without its engines': they would import numpy into serve."""
    worker_command.worker_flags(parser, with_engines=False)


def _process(
    name: str,
    command: str,
    parts: Sequence[Part],
    environ: Mapping[str, str],
    extra_argv: tuple[str, ...] = (),
) -> Process:
    """One process running ``parts``, each its declared flags with the values given (the front
    end: the gateway's, then ``--bridge`` and the bridge's)."""
    argv, env = [command], dict(environ)
    for index, (declare, values) in enumerate(parts):
        flags = _declared(declare)
        argv += [*([BRIDGE] if index else []), *_argv(flags, values)]
        env = _environment(flags, values, env)
    return Process(name, (*argv, *extra_argv), env)


def _declared(declare: Declare) -> list[argparse.Action]:
    parser = settings.FlagParser(add_help=False)
    declare(parser)
    return [action for action in parser.flags if action.option_strings]


def _argv(flags: list[argparse.Action], values: Mapping[str, Any]) -> list[str]:
    """``--flag=value`` for each declared flag with a value; a flag with none keeps its default."""
    argv = []
    for action in flags:
        value = values.get(action.dest)
        if action.dest in BY_ENVIRONMENT or value is None:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch: store_true
            argv += [flag] if value else []
        else:
            argv.append(f"{flag}={value}")  # "=": a value starting with "-" stays a value
    return argv


def _environment(flags: list[argparse.Action], values: Mapping[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with the declared secrets set, or unset where they have no value."""
    env = dict(environ)
    for action in flags:
        if action.dest in BY_ENVIRONMENT:
            value = values.get(action.dest)
            if value is None:
                env.pop(settings.env_name(action.dest), None)
            else:
                env[settings.env_name(action.dest)] = str(value)
    return env

"""Cluster credentials: what members of one tokenwire cluster show each other.

Two kinds of credentials guard tokenwire and they never mix: users' API keys
guard the public API (``gateway.auth``); cluster credentials guard everything
between members, every ``RegistryService`` and every ``WorkerService`` RPC.
A member proves itself with

- a shared token (``--cluster-token-file``, ``TOKENWIRE_CLUSTER_TOKEN`` or
  ``--cluster-token``), sent as ``x-tokenwire-cluster-token`` metadata and
  compared in constant time; or
- a client certificate (mTLS): a server given ``--tls-client-ca`` accepts only
  TLS clients whose certificate that CA signed (grpc refuses the others during
  the handshake), and members dial with their ``--tls-cert``/``--tls-key``.

Both are process-wide settings (like TLS), made once by the command line with
:func:`configure`. :class:`ClusterAuthInterceptor` is the one check; health and
reflection stay open for probes. A token is never logged and never put on a
command line: ``serve`` hands its own to its parts in the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from common import errors

log = logging.getLogger("tokenwire")

TOKEN_METADATA = "x-tokenwire-cluster-token"
PROTECTED_PREFIXES = ("/tokenwire.v1.RegistryService/", "/tokenwire.v1.WorkerService/")
MIN_TOKEN_LENGTH = 16

FIX_HINT = "every member needs the same cluster token, or a client certificate from the CA the servers trust"
FLAGS_HINT = (
    "give the cluster's credentials: --cluster-token-file FILE (or TOKENWIRE_CLUSTER_TOKEN), "
    "or mTLS with --tls-client-ca CA --tls-cert CERT --tls-key KEY; "
    "or --insecure-cluster to let anyone who can reach it in"
)


@dataclass(frozen=True)
class _Settings:
    digest: bytes | None = None  # SHA-256 of the token
    metadata: tuple[tuple[str, str], ...] = ()  # what our own calls carry
    mtls: bool = False  # our servers require client certificates

    @property
    def closed(self) -> bool:
        return self.digest is not None or self.mtls


_settings = _Settings()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def configure(token: str | None, *, mtls: bool = False) -> None:
    """Set this process's cluster credentials: servers require them, calls carry them."""
    global _settings
    if token:
        _settings = _Settings(_digest(token), ((TOKEN_METADATA, token),), mtls)
    else:
        _settings = _Settings(mtls=mtls)


def call_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that proves membership on a call to a registry or a worker."""
    return _settings.metadata


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The token from ``--cluster-token`` (or its environment variable) or a file."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as error:
            raise SystemExit(f"cannot read --cluster-token-file {token_file}: {error.strerror}") from None
        if not token:
            raise SystemExit(f"--cluster-token-file {token_file} is empty")
    if token is not None:
        token = token.strip()
        if token and len(token) < MIN_TOKEN_LENGTH:
            raise SystemExit(
                f"the cluster token is too short: use at least {MIN_TOKEN_LENGTH} characters "
                "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
    return token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may well be reachable from elsewhere


def check_listen(part: str, hosts: list[str], *, insecure: bool) -> None:
    """Refuse to serve beyond loopback without cluster credentials (before binding anything)."""
    exposed = [host for host in hosts if not is_loopback(host)]
    if not exposed or _settings.closed:
        return
    if insecure:
        log.warning("%s listens on %s with no cluster credentials (--insecure-cluster)", part, exposed[0])
        return
    raise SystemExit(
        f"refusing to start: the {part} would listen on {exposed[0]}, beyond loopback, with no cluster "
        f"credentials, so anyone who reaches it could join or use the cluster. To fix it, {FLAGS_HINT}."
    )


def _token_matches(metadata: tuple[tuple[str, str | bytes], ...] | None, digest: bytes) -> bool:
    presented = b""
    for key, value in metadata or ():
        if key == TOKEN_METADATA:
            presented = value if isinstance(value, bytes) else value.encode()
    # Digests of equal length: the comparison takes the same time whatever is sent.
    return hmac.compare_digest(hashlib.sha256(presented).digest(), digest)


def _peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The verified client certificate's subject, if the caller presented one.

    The subject, not the SANs: members' certificates may well share an IP SAN.
    """
    auth = context.auth_context()
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            return values[0].decode(errors="replace")
    return None


def identity(context: grpc.aio.ServicerContext) -> str:
    """Which credential made this call: the client certificate, else the token.

    The registry ties each worker to it; the token itself is never kept.
    """
    if _settings.mtls:
        peer = _peer_identity(context)
        if peer is not None:
            return "cert:" + peer
    if _settings.digest is not None:
        return "token:" + _settings.digest.hex()[:16]
    return ""


class ClusterAuthInterceptor(grpc.aio.ServerInterceptor):
    """The one check of cluster credentials, on every registry and worker RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        settings = _settings
        if handler is None or not settings.closed or not handler_call_details.method.startswith(PROTECTED_PREFIXES):
            return handler
        if settings.digest is not None and not _token_matches(
            handler_call_details.invocation_metadata,
            settings.digest,
        ):
            return _wrap(handler, lambda context: False)
        if settings.mtls:
            # The TLS handshake already required a certificate from our CA;
            # checked again per call, so a server set up without it fails closed.
            return _wrap(handler, lambda context: _peer_identity(context) is not None)
        return handler


def _wrap(handler: grpc.RpcMethodHandler, allowed: Callable[[grpc.aio.ServicerContext], bool]) -> grpc.RpcMethodHandler:
    """The handler, behind ``allowed``: UNAUTHENTICATED, with no detail, when it says no."""
    error = errors.cluster_unauthenticated()

    async def check(context: grpc.aio.ServicerContext) -> None:
        if not allowed(context):
            await context.abort(error.status, error.message, error.trailing_metadata())

    if handler.unary_unary is not None or handler.stream_unary is not None:
        kind = "unary_unary" if handler.unary_unary is not None else "stream_unary"
        unary = getattr(handler, kind)

        async def checked_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await unary(request, context)

        return handler._replace(**{kind: checked_unary})
    kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
    stream = getattr(handler, kind)

    async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await check(context)
        async for response in stream(request, context):
            yield response

    return handler._replace(**{kind: checked_stream})

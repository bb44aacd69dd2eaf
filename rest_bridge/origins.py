"""Which browsers' requests the bridge serves (docs/security.md#browsers).

A web page the user visits can send requests to a server on the user's machine. Three rules
keep it from driving tokenwire:

- CORS: no foreign origin may read an answer, or send JSON (a preflight asks first), unless
  ``--allowed-origins`` names it (FastChat's forms: comma-separated or a JSON list; ``*`` any).
  The chat page at ``/`` is same-origin and needs none.
- JSON only with a JSON content type (``exchange.read_json``): a page may send ``text/plain`` or
  a form to any site without asking first (a "simple request"); ``application/json`` it may not.
- Host: a page of the attacker's name, which the attacker's DNS later resolves to 127.0.0.1
  (DNS rebinding), is same-origin with the server. On a loopback bind only loopback names
  (``localhost``, ``*.localhost``, 127.0.0.0/8, ``::1``) and the ``--allowed-hosts`` names are
  served; on a public bind the check applies when ``--allowed-hosts`` is given.

Both checks run on every request: the Host check is one header scan and a dict lookup once a
Host has been seen; CORS is not installed at all while no origin is allowed.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from common import errors
from rest_bridge.config import BridgeSettings
from rest_bridge.exchange import error_response

_HOST = b"host"
_SEEN_MAX = 256  # Host values remembered with their verdict (a client can send any number)


def is_loopback(name: str) -> bool:
    """Whether ``name`` (a host name or address, no port) always means this machine."""
    name = name.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True  # RFC 6761: never resolved through DNS, so never rebound
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def allowed_hosts(bind: str, configured: list[str]) -> frozenset[str] | None:
    """The names served besides loopback ones; None: every Host (``*``, or a public bind told nothing)."""
    if "*" in configured or (not configured and not is_loopback(bind)):
        return None
    return frozenset(name.rstrip(".").lower() for name in configured)


class HostCheck:
    """ASGI: a 403 for a request whose Host is neither a loopback name nor allowed."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed
        self._seen: dict[bytes, bool] = {}

    def _served(self, header: bytes) -> bool:
        verdict = self._seen.get(header)
        if verdict is None:
            name = host_name(header.decode("latin-1")).rstrip(".").lower()
            verdict = name in self.allowed or is_loopback(name)
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[header] = verdict
        return verdict

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            # No Host at all (HTTP/1.0): not a browser, which always sends one.
            for key, value in scope["headers"]:
                if key == _HOST:
                    if not self._served(value):
                        response = error_response(errors.host_not_allowed(value.decode("latin-1")))
                        await response(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


def install(app: FastAPI, settings: BridgeSettings) -> None:
    """CORS for the allowed origins, and the Host check, on ``app``."""
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=settings.allow_credentials,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            expose_headers=["X-Request-Id"],
        )
    if settings.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts)

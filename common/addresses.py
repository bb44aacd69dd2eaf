"""Network addresses, one rule each: ``host:port`` both ways, and where a process on this
machine reaches a server bound to a wildcard.

An IPv6 literal goes in brackets (``[::1]:50051``), as gRPC targets and URLs want it; a
bare one (``::1:50051``, the form a ``READY`` line once had) still splits on its last colon.
"""

from __future__ import annotations

# Hosts that mean "every interface": a server bound there is reached on loopback.
WILDCARDS = ("0.0.0.0", "::", "")


def join(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port``, the host without brackets; ValueError without a port."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"not host:port: {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def local(host: str, port: int | str) -> str:
    """Where a process on this machine reaches a server bound to ``host``: loopback for a wildcard."""
    return join("127.0.0.1" if host.strip("[]") in WILDCARDS else host, port)


def from_url(value: str | None) -> str | None:
    """FastChat writes addresses as URLs (``http://localhost:21001``); gRPC wants ``host:port``."""
    if value and value.startswith(("http://", "https://")):
        return value.split("://", 1)[1].rstrip("/")
    return value

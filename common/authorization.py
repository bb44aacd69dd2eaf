"""The ``Authorization`` header (``authorization`` metadata on gRPC), read in one place: the
gateway's API-key check and the bridge's owner of a stored response both parse it here."""

from __future__ import annotations


def parse_authorization(value: str | None) -> tuple[str, str]:
    """The scheme (lower-cased) and the credential after it; "" for what is missing.

    ``"Bearer  sk-1 "`` is ``("bearer", "sk-1")``.
    """
    scheme, _, credential = (value or "").strip().partition(" ")
    return scheme.lower(), credential.strip()


def bearer_key(value: str | None) -> str | None:
    """The key of ``Bearer <key>``; None for another scheme or no key."""
    scheme, key = parse_authorization(value)
    return key if scheme == "bearer" and key else None

"""The bridge's settings, from its flags (rest_bridge/command.py); the app keeps them in its state."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.sampling import Limits
from common.settings import DEFAULT_MAX_BODY_BYTES


@dataclass
class BridgeSettings:
    gateway_address: str = "127.0.0.1:50051"
    # The gateway's --max-n / --max-tokens-limit, for /openapi.json (the gateway enforces them).
    limits: Limits = field(default_factory=Limits)
    allow_credentials: bool = False
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The Responses API's store of responses (rest_bridge/responses/store.py).
    responses_store_size: int = 1000
    responses_store_bytes: int = 64 * 1024 * 1024
    # Seconds of silence after which an SSE stream sends ": keep-alive" (0: never).
    sse_keepalive_interval: float = 15.0

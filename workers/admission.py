"""What the worker decides about a request itself: what only it can know.

The gateway settles the request (max_tokens and its default) and the cheap
checks are common/limits.py's, run by the gateway and again here before a
request takes a slot. The worker knows one thing more, the exact prompt length
after its model's template, and checks the request's max_tokens against the
context with it.
"""

from __future__ import annotations

from common import limits
from tokenwire.v1 import worker_pb2
from workers.engine import Engine


def resolve_max_tokens(
    engine: Engine, request: worker_pb2.GenerateRequest, prompt_tokens: int, param: str
) -> int | None:
    """The request's max_tokens, None when it set none (up to the end of the
    context, which each engine knows best); a 400 for what cannot fit."""
    requested = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
    limits.check_fits(engine.info.context_length, prompt_tokens, requested, param, exact=True)
    return requested

"""``python -m workers.engines.llama_cpp --self-check``: load the embedded model and decode a few tokens.

``make install`` runs it: a llama.cpp build that cannot run on this CPU crashes the process
here, at install time, rather than a worker later.
"""

from __future__ import annotations

import asyncio
import sys

from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import Generation
from workers.engines.llama_cpp.engine import LlamaCppEngine
from workers.engines.llama_cpp.loading import default_model_path


def self_check() -> None:
    engine = LlamaCppEngine(default_model_path())

    async def check() -> str:
        await engine.start()
        request = worker_pb2.GenerateRequest(prompt=common_pb2.TextOrTokens(text="The capital of France is"))
        prepared = await engine.prepare(request)
        text = "".join([d.text async for ds in engine.generate(request, prepared, 4, Generation()) for d in ds])
        await engine.close()
        return text

    print(f"[tokenwire] llama.cpp self-check: decoded {asyncio.run(check())!r}")


if sys.argv[1:] != ["--self-check"]:
    sys.exit("usage: python -m workers.engines.llama_cpp --self-check")
self_check()

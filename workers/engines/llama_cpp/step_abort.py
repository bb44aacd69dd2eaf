"""Stopping a ``llama_decode`` in flight: how a batch step makes way for a person at once.

llama.cpp asks an abort callback after every node of the graph it computes (a few hundred
a micro-batch), and on ``true`` the decode returns 2 having removed the positions of the
micro-batch it was in (earlier micro-batches of the step stay: the scheduler removes them).

The callback is C's ``strlen`` over a two-byte buffer: ``strlen`` returns 1 when the first
byte is set and 0 when it is not, which is the ``bool`` llama.cpp reads. A Python callback
would take the GIL at every node, and wait for it whenever the event loop holds it; this
one never touches Python, so a step that is not stopped costs nothing more (8 alternated
rounds on 2 threads: 8-token steps 38.7 ms with it and 38.8 without, 72-token steps 303 and 307
ms). Setting the byte from another thread is enough: the compute thread reads it at its next
node, 0.2-1.6 ms later here.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

# What llama.cpp logs (at warning level) for every sequence of a stopped step: expected here,
# and counted (tokenwire_engine_batch_steps_aborted), so not printed.
ROLLBACK_LOG = b"decode: removing memory module entries"


class StepAbort:
    """The flag a context's decode polls; :meth:`request` stops the decode in flight."""

    def __init__(self, ctx: Any) -> None:
        from llama_cpp import llama_cpp as C

        self._flag = ctypes.create_string_buffer(2)  # b"\0\0": strlen 0, no abort
        self._strlen = ctypes.cast(ctypes.CDLL(None).strlen, C.ggml_abort_callback)
        C.llama_set_abort_callback(ctx, self._strlen, ctypes.cast(self._flag, ctypes.c_void_p))
        _quiet_rollback_log()

    def request(self) -> None:
        self._flag[0] = b"\x01"

    def clear(self) -> None:
        self._flag[0] = b"\x00"


@functools.cache
def _quiet_rollback_log() -> Any:
    """Pass llama.cpp's log to llama-cpp-python's printer, less the stopped step's lines (once a process)."""
    from llama_cpp import _logger
    from llama_cpp import llama_cpp as C

    @C.llama_log_callback
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if not text.startswith(ROLLBACK_LOG):
            _logger.llama_log_callback(level, text, user_data)

    C.llama_log_set(log, ctypes.c_void_p(0))
    return log  # cached: llama.cpp keeps calling it

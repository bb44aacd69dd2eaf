"""Where the sequences' KV lives in the one llama context (``--kv-cache``): two layouts, one interface.

:class:`UnifiedKv`: one pool of ``n_ctx`` cells for all sequences; a request alone can use
the whole context, and cached prefixes cost nothing until space is needed. When a step finds
no room, cached prefixes are evicted first; if that is not enough, the scheduler ends the
running sequence holding the most cells with ``length`` and the others go on.

:class:`PerSequenceKv`: every sequence id has a KV stream of its own. A finished stream keeps
only the positions evaluated as prompt, with the last one's logits (``Cached``): a
request with the same prompt samples its first token from them at admission, and one whose
prompt extends it takes the stream over and evaluates the rest. When its stream is needed, a
cached prompt is saved to host memory and restored into a free stream when a prompt shares
it. Copies between streams go through the sequence's state (:meth:`PerSequenceKv.copy`), and
a micro-batch takes only consecutive ids, so a new sequence takes the lowest stream no running
one uses (:meth:`PerSequenceKv.admit`) and the batch is ordered by id.

Both keep finished prompts in a :class:`PromptCache`.
"""

from __future__ import annotations

import abc
import ctypes
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.engines.llama_cpp.prompt_cache import PromptCache
from workers.engines.llama_cpp.scheduler import CHUNK, common_prefix

if TYPE_CHECKING:
    from workers.engines.llama_cpp.scheduler import Seq

log = logging.getLogger("tokenwire.engine.llama_cpp")


class KvLayout(abc.ABC):
    """What the scheduler asks of a KV layout (compute thread only)."""

    # Whether a finished prompt is cached with its last position's logits (an exact prompt cache).
    keeps_prompt_logits: bool
    # The positions one sequence can hold.
    n_ctx: int

    def __init__(self, ctx: Any, host_cache_bytes: int) -> None:
        from llama_cpp import llama_cpp as C

        self._C = C
        self._ctx = ctx  # a llama_context pointer
        self._memory = C.llama_get_memory(ctx)
        self.cache = PromptCache(host_cache_bytes, self._state)

    @abc.abstractmethod
    def admit(self, seq: Seq, running: set[int]) -> None:
        """Give a new sequence its id; per-sequence KV also reuses a cached prompt (``seq.n_past``)."""

    @abc.abstractmethod
    def cached_prefix(self, seq: Seq) -> tuple[int, int]:
        """The prompt positions a cached prefix gives ``seq``, and the id to copy them from (-1: none)."""

    @abc.abstractmethod
    def shareable(self, seq: Seq) -> list[int]:
        """The tokens of a running sequence's KV that another one may copy."""

    @abc.abstractmethod
    def batch_order(self, active: list[Seq]) -> list[Seq]:
        """The running sequences in the order their tokens go into a batch."""

    @abc.abstractmethod
    def copy(self, source: int, target: int, n: int) -> None:
        """Give ``target`` the first ``n`` positions of ``source``'s KV."""

    @abc.abstractmethod
    def release(self, seq: Seq, keep: bool) -> None:
        """A sequence leaves: keep its prompt cached (``keep``, where it can be), or free its KV."""

    def free(self, seq_id: int) -> None:
        """Empty a sequence id's KV."""
        self._rm(seq_id)

    def truncate(self, seq_id: int, n: int) -> None:
        """Keep only the first ``n`` positions of a sequence id's KV."""
        self._rm(seq_id, n)

    def evict_oldest(self) -> bool:
        """Free the KV of the oldest cached prompt; False if none is cached."""
        if not self.cache:
            return False
        self.free(self.cache.evict())
        return True

    def clear(self) -> None:
        """Forget every cached prompt, in the context and in host memory."""
        for seq_id in self.cache.clear():
            self.free(seq_id)

    def cells(self, seq_id: int) -> int:
        """The cells ``seq_id`` holds, read from llama.cpp's own KV metadata."""
        top = self._C.llama_memory_seq_pos_max(self._memory, seq_id)
        return 0 if top < 0 else top - self._C.llama_memory_seq_pos_min(self._memory, seq_id) + 1

    def _cache(self, seq_id: int, tokens: list[int], logits: np.ndarray | None) -> None:
        for redundant in self.cache.keep(seq_id, tokens, logits):
            self.free(redundant)

    def _rm(self, seq_id: int, start: int = -1) -> None:
        """Remove ``seq_id``'s positions from ``start`` on (-1: all of them)."""
        self._C.llama_memory_seq_rm(self._memory, seq_id, start, -1)

    def _state(self, seq_id: int) -> Any:
        size = self._C.llama_state_seq_get_size(self._ctx, seq_id)
        state = (ctypes.c_uint8 * size)()
        self._C.llama_state_seq_get_data(self._ctx, state, size, seq_id)
        return state


class UnifiedKv(KvLayout):
    """One pool of cells for every sequence id: ``parallel`` running ones and ``cache_slots`` cached prefixes."""

    keeps_prompt_logits = False

    def __init__(self, ctx: Any, *, parallel: int, cache_slots: int) -> None:
        super().__init__(ctx, host_cache_bytes=0)
        self.n_ctx = self._C.llama_n_ctx(ctx)
        self._cache_slots = cache_slots
        # The ids no sequence or cached prefix holds.
        self._free_ids = list(range(parallel + cache_slots))

    def admit(self, seq: Seq, running: set[int]) -> None:
        """A free id, or the oldest cached prefix's."""
        seq.seq_id = self._free_ids.pop() if self._free_ids else self._evict()

    def cached_prefix(self, seq: Seq) -> tuple[int, int]:
        best, source = self.cache.longest_prefix(seq.prompt)
        # From a cached prefix, whole chunks only: what is left is evaluated in the
        # same chunks as with nothing cached, so the same request gives the same text.
        return min(best, len(seq.prompt) - 1) // CHUNK * CHUNK, source

    def shareable(self, seq: Seq) -> list[int]:
        return seq.tokens[: seq.n_past]

    def batch_order(self, active: list[Seq]) -> list[Seq]:
        return active

    def copy(self, source: int, target: int, n: int) -> None:
        self._C.llama_memory_seq_cp(self._memory, source, target, 0, n)  # tags the same cells

    def release(self, seq: Seq, keep: bool) -> None:
        tokens = seq.tokens[: seq.n_past]
        if keep and tokens and self._cache_slots:
            self._cache(seq.seq_id, tokens, None)
        else:
            self.free(seq.seq_id)

    def free(self, seq_id: int) -> None:
        super().free(seq_id)
        self._free_ids.append(seq_id)

    def _evict(self) -> int:
        seq_id = self.cache.evict()
        self._rm(seq_id)
        return seq_id


class PerSequenceKv(KvLayout):
    """A stream of ``n_ctx`` cells for each of ``streams`` sequence ids; prompts leaving them go to host memory."""

    keeps_prompt_logits = True

    def __init__(self, ctx: Any, *, streams: int, host_cache_bytes: int) -> None:
        super().__init__(ctx, host_cache_bytes)
        self.n_ctx = self._C.llama_n_ctx_seq(ctx)
        self._streams = streams

    def admit(self, seq: Seq, running: set[int]) -> None:
        """The lowest stream no running sequence uses, starting from the cached prompt that gives the most of ours.

        Running sequences keep consecutive ids, which llama.cpp's micro-batches need (ids 0, 2,
        4, 6 made half the tokens/s of 0-3). A cached prompt holds only positions evaluated as
        prompt, at the cells a fresh run puts them in, and is reused whole with its logits or in
        whole chunks (Cached.reusable): the request gives the same text as with nothing cached.
        It is used in place, copied from its idle stream, or restored from host memory; what the
        stream held before is saved to host memory first.
        """
        target = next(i for i in range(self._streams) if i not in running)
        best, entry, source = 0, None, -1  # source: an idle stream, -1 for host memory
        if not seq.prompt_rows:  # those need every prompt row's logits: evaluated whole
            best, entry, source = self.cache.best(seq.prompt)
        held = self.cache.take(target)
        if held is not None and (entry is not held or common_prefix(held.tokens, seq.prompt) < len(held.tokens)):
            self.cache.save(target, held)  # it holds more than what we reuse of it
        if entry is None:
            self._rm(target)
        elif source >= 0 and source != target:
            self.copy(source, target, best)
            self.cache.touch(source)
        elif source < 0:
            self.cache.touch_saved(entry)
            if not self._C.llama_state_seq_set_data(self._ctx, entry.state, len(entry.state), target):
                log.warning("llama_cpp: could not restore a cached prompt of %d tokens", len(entry.tokens))
                self._rm(target)
                best, entry = 0, None
        self._rm(target, best)
        seq.seq_id, seq.n_past = target, best
        if entry is not None and best == len(seq.prompt):
            seq.first_logits = entry.logits

    def cached_prefix(self, seq: Seq) -> tuple[int, int]:
        return seq.n_past, -1  # admit has put the best cached prompt in place already

    def shareable(self, seq: Seq) -> list[int]:
        # Only what was evaluated as prompt is copied (exact, see admit).
        return seq.prompt[: seq.n_past]

    def batch_order(self, active: list[Seq]) -> list[Seq]:
        # llama.cpp puts consecutive ids, in batch order, into one micro-batch.
        return sorted(active, key=lambda s: s.seq_id)

    def copy(self, source: int, target: int, n: int) -> None:
        # Across streams llama_memory_seq_cp copies whole buffers (all --n-ctx cells); the sequence's
        # state holds only its own cells. Restored into an empty stream they land where a fresh run puts them.
        state = self._state(source)
        if not self._C.llama_state_seq_set_data(self._ctx, state, len(state), target):
            raise RuntimeError(f"llama.cpp could not copy sequence {source}'s KV")
        self._rm(target, n)

    def release(self, seq: Seq, keep: bool) -> None:
        # Only what was evaluated as prompt stays: decoded positions differ in their bits.
        tokens = seq.tokens[: seq.n_past][: len(seq.prompt)]
        self._rm(seq.seq_id, len(tokens))
        if keep and tokens:
            self._cache(seq.seq_id, tokens, seq.first_logits if len(tokens) == len(seq.prompt) else None)
        else:
            self.free(seq.seq_id)

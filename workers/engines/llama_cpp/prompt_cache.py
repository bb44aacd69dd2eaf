"""Finished prompts kept for later requests: the prefix cache and, with per-sequence KV, the host prompt cache.

An entry stays in the context, under the idle sequence id whose KV holds it, until its id
or its cells are needed (oldest first). With per-sequence KV an entry leaving its stream is
saved to host memory (its sequence state, up to ``host_cache_bytes``), to be restored into
a free stream when a later prompt shares it. This class keeps the books; the KV layout
(:mod:`workers.engines.llama_cpp.kv_layout`) moves the KV itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.engines.llama_cpp.scheduler import CHUNK, common_prefix


@dataclass(eq=False)
class Cached:
    """A finished prompt's KV kept for reuse: in its idle stream, or saved to host memory."""

    tokens: list[int]
    # The last prompt position's logits (per-sequence KV): a request for the same prompt
    # samples its first token from them, with nothing to evaluate.
    logits: np.ndarray | None = None
    # Host memory: the sequence's state (llama_state_seq_get_data), None while in its stream.
    state: Any = None

    @property
    def nbytes(self) -> int:
        return (len(self.state) if self.state is not None else 0) + (0 if self.logits is None else self.logits.nbytes)

    def reusable(self, prompt: list[int]) -> int:
        """The positions of ``prompt`` this entry gives: all of it with the logits, else whole chunks."""
        if self.logits is not None and self.tokens == prompt:
            return len(prompt)
        # Whole chunks: the rest is evaluated in the groups it would be with nothing cached, so the
        # same request gives the same text (at least the last token is evaluated: its logits).
        return min(common_prefix(self.tokens, prompt), len(prompt) - 1) // CHUNK * CHUNK


class PromptCache:
    """The cached prompts, in the context (by sequence id) and in host memory, oldest first."""

    def __init__(self, host_cache_bytes: int, read_state: Callable[[int], Any]) -> None:
        self._entries: OrderedDict[int, Cached] = OrderedDict()
        self._saved: OrderedDict[tuple[int, ...], Cached] = OrderedDict()
        self._host_cache_bytes = host_cache_bytes
        self._read_state = read_state  # a sequence's state, for host memory
        self.saved_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        """The sequence ids holding cached prompts."""
        return iter(self._entries)

    def longest_prefix(self, prompt: list[int]) -> tuple[int, int]:
        """The most positions of ``prompt`` an entry in the context holds, and its id (-1: none)."""
        best, source = 0, -1
        for seq_id, cached in self._entries.items():
            common = common_prefix(cached.tokens, prompt)
            if common > best:
                best, source = common, seq_id
        return best, source

    def best(self, prompt: list[int]) -> tuple[int, Cached | None, int]:
        """The entry, in the context or in host memory, that gives the most of ``prompt``
        (:meth:`Cached.reusable`): the positions, the entry, its id (-1: in host memory)."""
        best, entry, source = 0, None, -1
        for seq_id, cached in [*self._entries.items(), *((-1, c) for c in self._saved.values())]:
            reuse = cached.reusable(prompt)
            if reuse > best:
                best, entry, source = reuse, cached, seq_id
        return best, entry, source

    def take(self, seq_id: int) -> Cached | None:
        """The entry held by ``seq_id``, no longer cached there (its id is taken)."""
        return self._entries.pop(seq_id, None)

    def touch(self, seq_id: int) -> None:
        """An entry in the context was reused: it is evicted last."""
        if seq_id in self._entries:
            self._entries.move_to_end(seq_id)

    def touch_saved(self, cached: Cached) -> None:
        """The same for an entry in host memory (unless saving another one has just pushed it out)."""
        key = tuple(cached.tokens)
        if key in self._saved:
            self._saved.move_to_end(key)

    def keep(self, seq_id: int, tokens: list[int], logits: np.ndarray | None) -> list[int]:
        """Cache the prompt ``seq_id`` holds; return the ids of the entries it extends, now
        redundant (saved to host memory first: their logits still start that prompt at once),
        whose KV the caller frees."""
        redundant = [
            sid for sid, cached in self._entries.items() if common_prefix(cached.tokens, tokens) == len(cached.tokens)
        ]
        for sid in redundant:
            self.save(sid, self._entries.pop(sid))
        self._entries[seq_id] = Cached(tokens, logits)
        return redundant

    def evict(self) -> int:
        """Take the oldest entry out of the context, saved to host memory first; return its id,
        whose KV the caller frees."""
        seq_id, cached = self._entries.popitem(last=False)
        self.save(seq_id, cached)
        return seq_id

    def save(self, seq_id: int, cached: Cached) -> None:
        """Keep the prompt ``seq_id`` holds in host memory, if it can give a later request anything."""
        if not self._host_cache_bytes or (cached.logits is None and len(cached.tokens) < CHUNK):
            return
        key = tuple(cached.tokens)
        if key in self._saved:
            self._saved.move_to_end(key)
            return
        saved = Cached(cached.tokens, cached.logits, self._read_state(seq_id))
        self._saved[key] = saved
        self.saved_bytes += saved.nbytes
        while self.saved_bytes > self._host_cache_bytes:
            _, old = self._saved.popitem(last=False)
            self.saved_bytes -= old.nbytes

    def clear(self) -> list[int]:
        """Forget every entry, in the context and in host memory; return the ids whose KV the caller frees."""
        self._saved.clear()
        self.saved_bytes = 0
        ids = list(self._entries)
        self._entries.clear()
        return ids

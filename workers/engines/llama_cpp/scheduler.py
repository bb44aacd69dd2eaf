"""Continuous batching over one llama.cpp context: many sequences, one ``llama_decode`` per step.

The llama_cpp engine hands every admitted generation to a :class:`Scheduler`. The
scheduler runs on the engine's one compute thread (see
:func:`workers.engine.compute_thread`) while it has work, and each *step*:

1. drops the sequences whose caller went away (their KV cells are freed with
   ``llama_memory_seq_rm``, so a cancel costs at most the step in flight);
2. admits waiting sequences while fewer than ``parallel`` run, each reusing the
   longest prefix it shares with a cached or running sequence (in a unified KV
   cache that only tags the cells, nothing is copied), or following a
   sequence being prefilled with the same prompt (``n > 1``: one prompt evaluation,
   its KV shared when it completes) or with a longer shared prefix (the template's
   system prompt: copied when the leader's KV holds it, the rest prefilled after);
3. builds one batch: one token for every decoding sequence, then prompt chunks
   of the sequences being prefilled, up to ``prefill_budget`` prompt tokens, so a
   long prompt never stalls the streams already decoding;
4. decodes it, samples every sequence with its own sampler
   (:mod:`workers.engines.llama_cpp.sampling`), and hands the deltas of all sequences
   to their event loops in one call per loop.

Prompt chunks end on multiples of :data:`CHUNK` positions, a sequence gets as many
whole chunks per step as the budget holds, and llama.cpp computes the step in
micro-batches of ``CHUNK`` tokens (``n_ubatch``): alone on the worker, a prompt is
always evaluated in the same groups, whatever the budget or what was cached before,
so "same seed, same request, same text" holds. Prefixes shared with running
sequences are reused at any length: a request beside others is not alone. Batched with others, numerics differ slightly (the matrix kernels depend
on the batch shape), as in every batching server.

Where the KV lives, unified or a stream per sequence (``--kv-cache``), and which finished
prompts stay cached, is the KV layout's business (:mod:`workers.engines.llama_cpp.kv_layout`,
:mod:`workers.engines.llama_cpp.prompt_cache`): the scheduler asks it for ids, copies and
cached prefixes. When a step finds no room, cached prefixes are evicted first; if that is
not enough, the running sequence holding the most cells ends with ``length`` and the others go on.

Batch tier (``--batch-yield``): interactive sequences are admitted and prefilled first. With
``preempt`` (the default), batch sequences pause (their KV kept) while an interactive one runs,
and when an interactive sequence finds every sequence id taken, the batch sequence with the
fewest generated tokens is preempted: it ends with a 429, so the gateway's batch runner tries it
again later. An interactive request that arrives while a step of batch work alone is being
computed stops that step (:mod:`workers.engines.llama_cpp.step_abort`): on a CPU a full step
takes up to half a second, which would otherwise be the request's wait for its first token. The
stopped step's positions are removed and it is computed again after the interactive work.
With ``reserve``, batch sequences decode beside interactive ones and are never stopped; only
the worker's reserved slots (``--reserved-slots``) keep room for people.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from common import errors
from workers.engine import BatchStats, Delta, Generation
from workers.engines.llama_cpp.sampling import Sampler
from workers.engines.llama_cpp.step_abort import StepAbort

if TYPE_CHECKING:
    from workers.engines.llama_cpp.kv_layout import KvLayout

log = logging.getLogger("tokenwire.engine.llama_cpp")

# How batch sequences yield to interactive ones (see the module's docstring); chosen by bench/batch_tier.py.
BATCH_YIELDS = ("preempt", "reserve")
DEFAULT_BATCH_YIELD = "preempt"
# llama_decode's return codes the scheduler handles: no KV slot for the batch; stopped by StepAbort.
NO_KV_SLOT, ABORTED = 1, 2
# Prompt evaluation granularity (32-token batches run prompt eval as fast as 512-token ones here).
CHUNK = 32
# Prompt tokens worth waiting one step for, to copy them from a sequence being prefilled.
MIN_SHARE = 8

_END = object()


class Handler:
    """What a sequence does with its tokens (the engine's text, stop and logprob handling)."""

    def prompt_done(self, rows: list[np.ndarray]) -> list[Delta]:  # pragma: no cover - interface
        """The prompt is in the KV cache; ``rows`` are its logits rows when asked for."""
        raise NotImplementedError

    def token(self, token: int, logits: np.ndarray | None) -> tuple[list[Delta], bool]:  # pragma: no cover
        """A sampled token: the deltas it completes, and whether the sequence is done."""
        raise NotImplementedError

    def end(self, finish: str) -> list[Delta]:  # pragma: no cover - interface
        """The last deltas when the scheduler ends the sequence ("length")."""
        raise NotImplementedError


@dataclass(eq=False)
class Seq:
    """One generation in the scheduler."""

    prompt: list[int]
    max_tokens: int
    generation: Generation
    handler: Handler
    # The request's sampler (sampling.make_sampler), built on the compute thread at
    # admission and closed when the sequence leaves.
    make_sampler: Callable[[], Sampler]
    # Every prompt row's logits (echo with logprobs): no prefix reuse, no sharing.
    prompt_rows: bool = False
    # The next-token distribution is needed (logprobs).
    logits: bool = False
    # Hand the deltas over together at the end (a non-streamed choice).
    buffered: bool = False
    # Batch tier: admitted after interactive sequences, paused while any runs.
    batch: bool = False
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    # Scheduler state (compute thread only).
    seq_id: int = -1
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds, position by position
    n_past: int = 0
    # Prompt positions this sequence ran through the model (the rest came from a cache or a leader).
    evaluated: int = 0
    generated: int = 0
    last: int = -1
    decoding: bool = False
    sampler: Sampler | None = None
    leader: Seq | None = None
    # Following a leader only up to here (prompts sharing a prefix); 0: the same prompt.
    share: int = 0
    followers: list[Seq] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    held: list[Delta] = field(default_factory=list)
    # Where this step put the sequence in the batch: (first row, count).
    chunk: tuple[int, int] = (0, 0)
    # Per-sequence KV: the last prompt position's logits, kept with the cached prompt.
    first_logits: np.ndarray | None = None


class Scheduler:
    def __init__(
        self,
        ctx: Any,
        n_vocab: int,
        kv: KvLayout,
        *,
        parallel: int,
        prefill_budget: int,
        pool: Executor,
        stats: BatchStats | None = None,
        preempt_batch: bool = True,
    ) -> None:
        from llama_cpp import llama_cpp as C

        self._C = C
        self._ctx = ctx  # a llama_context pointer
        self._kv = kv
        self._n_ctx = kv.n_ctx
        self._n_vocab = n_vocab
        self.parallel = parallel
        self.prefill_budget = max(prefill_budget, CHUNK)
        self._pool = pool
        self._capacity = parallel + self.prefill_budget
        self._batch = C.llama_batch_init(self._capacity, 0, 1)
        self._lock = threading.Lock()
        self._inbox: list[Seq] = []
        self._looping = False
        self._waiting: deque[Seq] = deque()
        self._active: list[Seq] = []
        self._out: dict[asyncio.AbstractEventLoop, list[tuple[Seq, list[Any]]]] = {}
        self.stats = stats or BatchStats(parallel=parallel)
        self.preempt_batch = preempt_batch
        # Set (under the lock) while a step of batch sequences alone is computed: an interactive
        # submit then stops it.
        self._abort = StepAbort(ctx) if preempt_batch else None
        self._step_abortable = False

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    # -- the event loop side --

    def submit(self, seq: Seq) -> None:
        with self._lock:
            self._inbox.append(seq)
            self.stats.waiting += 1
            start, self._looping = not self._looping, True
            if self._abort is not None and self._step_abortable and not seq.batch:
                self._abort.request()
        if start:
            self._pool.submit(self._run)

    def close(self) -> None:
        """Free the batch (compute thread, once no sequence is left)."""
        self._C.llama_batch_free(self._batch)

    # -- the compute thread --

    def _run(self) -> None:
        while True:
            with self._lock:
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                idle = not self._waiting and not self._active
                if idle:
                    self._looping = False
            if idle:
                self._update_counts()
                return
            try:
                self._step()
            except BaseException as exc:  # handed to every caller
                log.exception("llama_cpp: a batch step failed")
                for seq in [*self._active, *self._waiting]:
                    self._emit(seq, [exc], done=True)
                    self._drop(seq, keep=False)
                self._waiting.clear()
            self._update_counts()
            self._flush()

    def _step(self) -> None:
        self._reap()
        self._admit()
        if self._out:  # first tokens sampled from cached logits at admission: out before this step's decode
            self._update_counts()  # what a caller that sees its end may read
            self._flush()
        else:
            self._update_counts(cells=False)  # who runs and waits during the step; cells after it
        n = self._fill()
        if n == 0:
            return
        code = self._decode(n)
        if code in (NO_KV_SLOT, ABORTED):  # the step is built again next time
            self._undo_fill()
            if code == NO_KV_SLOT:
                self._relieve()
            else:  # an interactive request came: its turn first
                self.stats.batch_steps_aborted_total += 1
            return
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        self._after_decode(n)

    def _decode(self, n: int) -> int:
        batch_only = all(s.batch for s in self._active if s.chunk[1])
        abort = self._abort if batch_only else None
        with self._lock:
            if abort is not None and any(not s.batch for s in self._inbox):
                return ABORTED  # one came while the step was being built
            self._step_abortable = abort is not None
        self._batch.n_tokens = n
        try:
            return int(self._C.llama_decode(self._ctx, self._batch))
        finally:
            if abort is not None:
                with self._lock:
                    self._step_abortable = False
                    abort.clear()

    def _reap(self) -> None:
        for seq in [s for s in self._waiting if s.generation.cancelled.is_set()]:
            self._waiting.remove(seq)
            self._emit(seq, [], done=True)
        for seq in [s for s in self._active if s.generation.cancelled.is_set()]:
            self._emit(seq, [], done=True)
            self._drop(seq, keep=False)

    def _admit(self) -> None:
        if self.preempt_batch:
            self._preempt_for_interactive()
        while self._waiting and len(self._active) < self.parallel:
            # Interactive first: a batch sequence waits while an interactive one does.
            seq = next((s for s in self._waiting if not s.batch), self._waiting[0])
            self._waiting.remove(seq)
            self._kv.admit(seq, {s.seq_id for s in self._active})
            self.stats.prompt_tokens_reused += seq.n_past  # what a cached prompt gave it
            seq.tokens = list(seq.prompt)
            try:
                seq.sampler = seq.make_sampler()
            except Exception as exc:
                self._fail(seq, exc)
                continue
            self._active.append(seq)
            if seq.first_logits is not None:  # the whole prompt was cached, with its logits
                self._start(seq, [], -1, saved=seq.first_logits)
                continue
            if not seq.prompt_rows:
                leader = next(
                    (
                        s
                        for s in self._active
                        if s is not seq and not s.decoding and s.leader is None and not s.prompt_rows
                        and s.prompt == seq.prompt
                    ),
                    None,
                )  # fmt: skip
                if leader is not None and seq.n_past == 0:
                    seq.leader = leader
                    leader.followers.append(seq)
                    continue
                self._reuse_prefix(seq)

    def _preempt_for_interactive(self) -> None:
        """Free a sequence id for each interactive sequence that waits for one, taken from batch sequences."""
        wanted = sum(not s.batch for s in self._waiting) - (self.parallel - len(self._active))
        while wanted > 0:
            # The one that loses least work; a sequence others follow keeps going (they need its KV).
            victims = [s for s in self._active if s.batch and not s.followers and s.leader is None]
            if not victims:
                return
            victim = min(victims, key=lambda s: len(s.tokens) - len(s.prompt))
            self.stats.batch_preempted_total += 1
            victim.held = []  # a buffered choice's deltas: the retry makes them again
            self._emit(victim, [errors.rate_limited("Preempted by an interactive request; retry.")], done=True)
            self._drop(victim, keep=False)
            wanted -= 1

    def _reuse_prefix(self, seq: Seq) -> None:
        """Start from the longest prefix of the prompt some sequence's KV already holds,
        or follow a sequence being prefilled up to the longer prefix it shares."""
        last = len(seq.prompt) - 1  # at least the last prompt token is evaluated: its logits give the first token
        best, source = self._kv.cached_prefix(seq)
        # Beside running sequences a request is not alone (batched numerics differ
        # anyway): any shared prefix is reused, such as the template's system prompt.
        leader, pending = None, 0
        for s in self._active:
            if s is seq or s.leader is not None:
                continue
            common = min(common_prefix(self._kv.shareable(s), seq.prompt), last)
            if common > best:
                best, source = common, s.seq_id
            if not s.decoding and not s.prompt_rows:
                ahead = min(common_prefix(s.prompt, seq.prompt), last)
                if ahead > pending:
                    leader, pending = s, ahead
        if leader is not None and pending >= best + MIN_SHARE:
            # Its KV will hold more of our prompt after its next step(s): wait for it.
            seq.leader, seq.share = leader, pending
            leader.followers.append(seq)
            return
        if source < 0 or best <= 0:
            return
        self._kv.copy(source, seq.seq_id, best)
        seq.n_past = best
        self.stats.prompt_tokens_reused += best
        self._kv.cache.touch(source)

    def _fill(self) -> int:
        """Put this step's tokens into the batch; return how many."""
        b, n = self._batch, 0

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            b.token[n] = token
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq_id
            b.logits[n] = logits
            n += 1

        active = self._kv.batch_order(self._active)
        if self.preempt_batch and any(not s.batch for s in active):
            # Batch sequences pause while an interactive one runs, their KV kept: on a CPU each
            # sequence in a step slows the step, and that time would be the interactive stream's.
            # (A batch sequence another one follows goes on, or its follower would wait forever.)
            active = [s for s in active if not s.batch or s.followers]
        for seq in active:
            if seq.decoding:
                seq.chunk = (n, 1)
                add(seq.last, seq.n_past, seq.seq_id, True)
                seq.tokens.append(seq.last)
        budget = self.prefill_budget
        for seq in active:
            if seq.decoding or seq.leader is not None:
                continue
            # As many whole chunks as the budget holds (the last one may end the prompt).
            end = seq.n_past
            while end < len(seq.prompt):
                after = min(len(seq.prompt), (end // CHUNK + 1) * CHUNK)
                if after - seq.n_past > budget:
                    break
                end = after
            count = end - seq.n_past
            if not count:
                break
            seq.chunk = (n, count)
            for pos in range(seq.n_past, end):
                add(seq.prompt[pos], pos, seq.seq_id, seq.prompt_rows or pos == len(seq.prompt) - 1)
            budget -= count
        return n

    def _after_decode(self, n: int) -> None:
        stats = self.stats
        sequences = 0
        for seq in list(self._active):
            first, count = seq.chunk
            if not count:
                continue
            seq.chunk = (0, 0)
            sequences += 1
            if seq.decoding:
                seq.n_past += 1
                self._sample(seq, first)
                continue
            stats.prompt_tokens_evaluated += count
            seq.evaluated += count
            if seq.prompt_rows:
                seq.rows.extend(self._row(first + i).copy() for i in range(count))
            seq.n_past += count
            for follower in [f for f in seq.followers if f.share and f.share <= seq.n_past]:
                self._hand_prefix(seq, follower, follower.share)
            if seq.n_past < len(seq.prompt):
                continue
            # The prompt is evaluated: it and every follower start decoding.
            last = first + count - 1
            for follower in seq.followers:
                self._kv.copy(seq.seq_id, follower.seq_id, seq.n_past)
                follower.n_past = seq.n_past
                follower.leader = None
                stats.prompt_tokens_reused += seq.n_past
                self._start(follower, [], last)
            seq.followers = []
            self._start(seq, seq.rows, last)
        stats.steps += 1
        stats.step_tokens_total += n
        stats.max_sequences_per_step = max(stats.max_sequences_per_step, sequences)
        stats.max_tokens_per_step = max(stats.max_tokens_per_step, n)
        for hook in stats.on_step:
            hook(sequences, n)

    def _start(self, seq: Seq, rows: list[np.ndarray], row: int, saved: np.ndarray | None = None) -> None:
        """The prompt is in the KV cache: sample the first token from ``row``, or the ``saved`` logits."""
        seq.rows = []
        seq.decoding = True
        if self._kv.keeps_prompt_logits and saved is None and not seq.prompt_rows:
            seq.first_logits = self._row(row).copy()  # kept with the prompt when it is cached
        try:
            deltas = seq.handler.prompt_done(rows)
        except Exception as exc:
            self._fail(seq, exc)
            return
        if deltas:
            self._emit(seq, deltas, done=False)
        self._sample(seq, row, saved)

    def _row(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._C.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))

    def _sample(self, seq: Seq, row: int, saved: np.ndarray | None = None) -> None:
        if seq.generation.cancelled.is_set():
            return  # leaves at the next step, without another token
        sampler = seq.sampler
        assert sampler is not None  # made at admission
        try:
            if saved is not None:
                logits = saved if seq.logits else None
                token = sampler.sample(saved)
            else:
                logits = self._row(row).copy() if seq.logits else None
                token = sampler.sample_row(self._ctx, row)
            seq.generation.produced()
            seq.generated += 1
            seq.last = token
            deltas, done = seq.handler.token(token, logits)
            # The context holds prompt and completion: the last token needs no cell, but counts.
            if not done and (seq.generated >= seq.max_tokens or seq.n_past + 1 >= self._n_ctx):
                deltas += seq.handler.end("length")
                done = True
        except Exception as exc:
            self._fail(seq, exc)
            return
        self._emit(seq, deltas, done)
        if done:
            self._drop(seq, keep=True)

    def _relieve(self) -> None:
        """No KV slot for the step: evict a cached prefix, or end the biggest running sequence."""
        self.stats.kv_exhausted_total += 1
        if self._kv.evict_oldest():
            return
        victim = max(self._active, key=lambda s: s.n_past)
        log.warning("llama_cpp: the KV cache is full; ending a sequence of %d tokens with length", victim.n_past)
        try:
            deltas = victim.handler.end("length")
        except Exception as exc:
            self._fail(victim, exc)
            return
        self._emit(victim, deltas, done=True)
        self._drop(victim, keep=False)

    def _undo_fill(self) -> None:
        """Forget the step _fill built, with the positions a stopped decode left in the KV."""
        for seq in self._active:
            if not seq.chunk[1]:
                continue
            if seq.decoding:
                seq.tokens.pop()
            self._kv.truncate(seq.seq_id, seq.n_past)
            seq.chunk = (0, 0)

    def _fail(self, seq: Seq, exc: Exception) -> None:
        """A request's own failure (its sampler, its output): it ends with the error, the batch runs on."""
        log.error("llama_cpp: a request failed; the others in its batch run on", exc_info=exc)
        self._emit(seq, [exc], done=True)
        self._drop(seq, keep=False)

    def _hand_prefix(self, leader: Seq, follower: Seq, n: int) -> None:
        """A follower of a shared prefix gets its first ``n`` positions and prefills the rest itself."""
        leader.followers.remove(follower)
        follower.leader, follower.share = None, 0
        if n > 0:
            self._kv.copy(leader.seq_id, follower.seq_id, n)
            follower.n_past = n
            self.stats.prompt_tokens_reused += n

    def _drop(self, seq: Seq, keep: bool) -> None:
        """Take a sequence out of the batch; keep its KV as a cached prefix, or free it."""
        if seq in self._active:
            self._active.remove(seq)
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
        for follower in [f for f in seq.followers if f.share]:
            # Cancelled while prefilling for others: what is there is theirs.
            self._hand_prefix(seq, follower, min(seq.n_past, follower.share))
        if seq.followers:
            # The first follower of the same prompt takes over.
            heir, *rest = seq.followers
            self._kv.copy(seq.seq_id, heir.seq_id, seq.n_past)
            heir.n_past, heir.leader, heir.followers = seq.n_past, None, rest
            for follower in rest:
                follower.leader = heir
            seq.followers = []
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        if seq.seq_id < 0:
            return
        self._kv.release(seq, keep)
        seq.seq_id = -1

    # -- hand-off --

    def _emit(self, seq: Seq, items: list[Any], done: bool) -> None:
        if seq.buffered and not done:
            seq.held.extend(items)
            return
        if seq.buffered:
            items = seq.held + items
            seq.held = []
        if done:
            last = next((item for item in reversed(items) if isinstance(item, Delta)), None)
            if last is not None:  # usage's cached_tokens: the prompt positions not evaluated
                last.cached_tokens = max(len(seq.prompt) - seq.evaluated, 0)
            items = [*items, _END]
        if items:
            self._out.setdefault(seq.loop, []).append((seq, items))

    def _flush(self) -> None:
        """One call per event loop for everything this step made."""
        out, self._out = self._out, {}
        for loop, batch in out.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    def _update_counts(self, cells: bool = True) -> None:
        stats = self.stats
        with self._lock:
            stats.waiting = len(self._waiting) + len(self._inbox)
        stats.running = len(self._active)
        if not cells:
            return
        # Read from llama.cpp's own KV metadata (what tests check is really freed), once a step.
        stats.kv_cells_in_use = sum(self._kv.cells(s.seq_id) for s in self._active if s.seq_id >= 0)
        stats.kv_cells_cached = sum(self._kv.cells(sid) for sid in self._kv.cache)
        stats.prompt_cache_bytes = self._kv.cache.saved_bytes

    def clear_cache(self) -> None:
        """Forget every cached prefix, in streams and in host memory (compute thread)."""
        self._kv.clear()
        self._update_counts()


def _deliver(batch: list[tuple[Seq, list[Any]]]) -> None:
    """On the event loop: each sequence's items of a step, as one entry of its queue."""
    for seq, items in batch:
        if items[-1] is _END:
            seq.released.set()
        seq.queue.put_nowait(items)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def stream(scheduler: Scheduler, seq: Seq) -> Any:
    """Submit ``seq`` and yield its deltas in lists: what the steps since the last
    list made; on the way out, wait until it has left the batch."""
    scheduler.submit(seq)
    try:
        while True:
            items = await seq.queue.get()
            while not seq.queue.empty():
                items = items + seq.queue.get_nowait()
            done = items[-1] is _END
            if done:
                items.pop()
            error = items.pop() if items and isinstance(items[-1], BaseException) else None
            if items:
                yield items
            if error is not None:
                raise error
            if done:
                return
    finally:
        seq.generation.cancelled.set()
        if not seq.released.is_set():
            # Freed at the scheduler's next step, even if we are being cancelled.
            await asyncio.shield(seq.released.wait())


__all__ = ["BATCH_YIELDS", "CHUNK", "DEFAULT_BATCH_YIELD", "BatchStats", "Handler", "Scheduler", "Seq", "stream"]

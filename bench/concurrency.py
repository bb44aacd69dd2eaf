"""Engine concurrency: tokenwire's batching llama_cpp worker beside llama.cpp's own ``llama-server``.

Same GGUF (the embedded SmolLM2-135M Q4_1), same threads, same context and parallel
sequences, one run, side by side. N clients in a closed loop each stream chat
completions of exactly 128 tokens (temperature 0.7, a seed per request, the end
tokens banned by ``logit_bias`` so every stream is full length). For each server and
each N: aggregate tokens/s over the window, per-stream decode tokens/s, time to first
token p50/p99, and the server's peak RSS (``VmHWM``). tokenwire is measured end to
end (REST bridge, gateway, worker); llama-server answers its own OpenAI endpoint.

Both sides sample the same distribution: temperature 0.7 over the whole vocabulary, what an
OpenAI request with only ``temperature`` means. llama-server is asked for that explicitly
(``top_k`` 0, ``top_p`` 1, ``min_p`` 0), because its own defaults (top_k 40, top_p 0.95,
min_p 0.05) truncate the distribution first, which is less work; ``llama-server-own``
measures it with those defaults, as a reference. Both run with flash attention off
(tokenwire's default, measured faster here; ``-fa off``).

``llama-server`` is built once into ``bench/.cache`` from the llama-cpp-python sdist
(:mod:`llama_server`). Both run without weight repacking (``--no-repack``; tokenwire
loads with ``use_extra_bufts=False``): on this AMX machine ggml's AMX path crashed.

    .venv/bin/python -m bench.run --sections concurrency
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time
from typing import Any

from bench import servers
from bench.engine_raw import StreamClock, stream_timing
from bench.llama_server import ensure_llama_server
from bench.servers import Group

STREAM_TOKENS = 128
CONCURRENCY = (1, 4, 8, 16)
EOG_BAN = {"0": -100, "2": -100, "4": -100}  # <|endoftext|>, <|im_end|>, <reponame>
PROMPTS = [
    "Write a story about a dragon who lives in a castle.",
    "Describe a walk on the beach at sunset.",
    "Explain how bread is made, step by step.",
    "Tell me about the moon and the tides.",
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# What llama-server needs to be told to sample like OpenAI (and tokenwire): no truncation.
WHOLE_VOCABULARY = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def one_stream(base: str, model: str, k: int, sampling: dict[str, float] | None = None) -> dict[str, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
        "max_tokens": STREAM_TOKENS,
        "temperature": 0.7,
        "seed": k,
        "logit_bias": EOG_BAN,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(sampling or {}),
    }
    return stream_timing(base, body, timeout=600)


def one_worker_stream(address: str, k: int) -> dict[str, float]:
    """The same stream straight from the worker's ``Generate`` (gRPC): the engine without the front end."""
    import grpc

    from tokenwire.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    stub = _worker_stub(address, grpc, worker_pb2_grpc)
    request = worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=PROMPTS[k % len(PROMPTS)])],
        sampling=worker_pb2.SamplingParams(
            temperature=0.7, seed=k, max_tokens=STREAM_TOKENS, logit_bias={int(t): v for t, v in EOG_BAN.items()}
        ),
    )
    clock = StreamClock()
    tokens = 0
    for message in stub.Generate(request, timeout=600):
        if message.delta.text:
            clock.content()
        if message.HasField("end"):
            tokens = message.end.usage.completion_tokens
    return clock.record(tokens)


_stubs: dict[str, Any] = {}


def _worker_stub(address: str, grpc: Any, worker_pb2_grpc: Any) -> Any:
    if address not in _stubs:  # one channel per worker, shared by the client threads
        _stubs[address] = worker_pb2_grpc.WorkerServiceStub(grpc.insecure_channel(address))
    return _stubs[address]


def closed_loop(
    base: str, model: str, clients: int, duration: float, sampling: dict[str, float] | None = None
) -> dict[str, Any]:
    """``clients`` threads streaming back to back for ``duration`` s; streams that end in the window count.

    ``base`` is an OpenAI server's URL, or ``grpc://<worker address>`` for the worker alone;
    ``sampling`` adds fields to each request body.
    """
    stream = (
        (lambda k: one_worker_stream(base.removeprefix("grpc://"), k))
        if base.startswith("grpc://")
        else (lambda k: one_stream(base, model, k, sampling))
    )
    records: list[dict[str, float]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + duration
    counter = iter(range(1 << 30))

    def client() -> None:
        while time.perf_counter() < stop_at:
            with lock:
                k = next(counter)
            record = stream(k)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start  # includes the streams that ran over the window
    tokens = sum(r["tokens"] for r in records)
    ttfts = sorted(r["ttft_s"] for r in records)

    def pct(p: float) -> float:
        return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else 0.0

    return {
        "clients": clients,
        "streams": len(records),
        "tokens": tokens,
        "elapsed_s": elapsed,
        "aggregate_tok_s": tokens / elapsed if elapsed else 0.0,
        "stream_tok_s": statistics.median(r["decode_tok_s"] for r in records) if records else 0.0,
        "ttft_p50_ms": 1000 * pct(0.50),
        "ttft_p99_ms": 1000 * pct(0.99),
        "short_streams": sum(1 for r in records if r["tokens"] != STREAM_TOKENS),
    }


def start_llama_server(group: Group, binary: str, gguf: str, threads: int, parallel: int, n_ctx: int) -> str:
    port = servers.free_port()
    server = servers.Server(
        "llama-server",
        [binary, "-m", gguf, "-c", str(n_ctx), "-np", str(parallel), "-t", str(threads), "-tb", str(threads),
         "--no-repack", "-fa", "off", "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
        ready_http=f"http://127.0.0.1:{port}/health",
        # Its libraries beside it, wherever the cache was built (its RUNPATH names the build directory).
        env={"LD_LIBRARY_PATH": os.path.dirname(binary)},
    )  # fmt: skip
    group.start(server, timeout=120)
    server.address = f"127.0.0.1:{port}"
    return f"http://127.0.0.1:{port}"


TARGETS = ("tokenwire", "tokenwire-worker", "llama-server", "llama-server-own")


def section_concurrency(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Every level, each target in turn, ``--concurrency-rounds`` times over (the rounds interleave)."""
    from bench.suite import NoiseMeter, project_eval, start_engine_stack, wait_quiet

    parallel = args.parallel
    threads = int(
        project_eval("from workers.engines.llama_cpp.loading import default_threads; print(default_threads())")
    )
    gguf = project_eval("from workers.engines.llama_cpp.loading import default_model_path; print(default_model_path())")
    n_ctx = 8192
    binary = str(ensure_llama_server(log=log))
    duration = max(args.duration, 4.0 if args.quick else 20.0)
    levels = CONCURRENCY[:2] if args.quick else CONCURRENCY
    levels = tuple(int(c) for c in args.concurrency_levels.split(",")) if args.concurrency_levels else levels
    names = [t.strip() for t in args.concurrency_targets.split(",")] if args.concurrency_targets else TARGETS
    rounds = max(1, args.concurrency_rounds)
    worker_args = args.worker_args.split() if args.worker_args else []
    section: dict[str, Any] = {
        "parallel": parallel,
        "threads": threads,
        "n_ctx": n_ctx,
        "stream_tokens": STREAM_TOKENS,
        "window_s": duration,
        "rounds": rounds,
        "worker_args": worker_args,
        # name -> clients -> one run per round
        "runs": {name: {} for name in names},
    }
    with Group() as group:
        stack = start_engine_stack(
            group, "chat", "llama_cpp", "--parallel", str(parallel), "--n-ctx", str(n_ctx), *worker_args
        )
        worker, tw_base = stack.worker, stack.base
        ls_base = start_llama_server(group, binary, gguf, threads, parallel, n_ctx)
        llama_proc = next(s for s in group.servers if s.name == "llama-server")
        every: dict[str, tuple[str, str, dict[str, float] | None]] = {
            "tokenwire": (tw_base, "chat", None),
            "tokenwire-worker": (f"grpc://{worker.address}", "chat", None),
            "llama-server": (ls_base, "smollm2", WHOLE_VOCABULARY),
            "llama-server-own": (ls_base, "smollm2", None),
        }
        targets = {name: every[name] for name in names}
        for base, model, sampling in targets.values():  # warm up: load pages, fill caches
            closed_loop(base, model, 2, 2.0, sampling)
        for round_ in range(rounds):
            for clients in levels:
                for name, (base, model, sampling) in targets.items():
                    noise = wait_quiet(max_wait=args.concurrency_quiet_wait)
                    cpu0, client0 = group.cpu(), _client_cpu()
                    with NoiseMeter(group) as meter:
                        run = closed_loop(base, model, clients, duration, sampling)
                    cpu1 = group.cpu()
                    run["noise_before"] = noise
                    run["noise_during"] = meter.share
                    # CPU per generated token of every process (µs), to split engine from front-end cost.
                    run["cpu_us_per_token"] = {
                        name: round(1e6 * (cpu1[name] - cpu0[name]) / max(1, run["tokens"]), 1) for name in cpu1
                    } | {"client": round(1e6 * (_client_cpu() - client0) / max(1, run["tokens"]), 1)}
                    section["runs"][name].setdefault(str(clients), []).append(run)
                    log(
                        f"  [{round_ + 1}/{rounds}] {name:16s} {clients:2d} streams: {run['aggregate_tok_s']:6.1f} "
                        f"tok/s aggregate, {run['stream_tok_s']:5.1f} per stream, TTFT p50 {run['ttft_p50_ms']:6.0f} "
                        f"ms p99 {run['ttft_p99_ms']:6.0f} ms ({run['streams']} streams, other CPU {100 * meter.share:.0f}%)"
                    )
                    log(f"      CPU us/token: {run['cpu_us_per_token']}")
        section["peak_rss_mb"] = {
            "tokenwire-worker": peak_rss_mb(worker.process.pid),  # type: ignore[union-attr]
            "llama-server": peak_rss_mb(llama_proc.process.pid),  # type: ignore[union-attr]
        }
    results["concurrency"] = section


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _runs(entry: Any) -> list[dict[str, Any]]:
    return entry if isinstance(entry, list) else [entry]  # older results.json: one run per level


def _span(values: list[float], fmt: str = "{:.0f}") -> str:
    """The median, with the range over rounds when there are several."""
    median = fmt.format(statistics.median(values))
    if len(values) < 2:
        return median
    return f"{median} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def render(section: dict[str, Any]) -> str:
    """This section in the report (RESULTS.generated.md): medians over the rounds, ranges in brackets."""
    runs = section["runs"]
    rounds = section.get("rounds", 1)
    has_worker = bool(runs.get("tokenwire-worker"))
    has_own = bool(runs.get("llama-server-own"))
    columns = [
        "streams",
        "llama-server tok/s",
        "tokenwire tok/s",
        "ratio",
        *(["worker alone tok/s", "ratio"] if has_worker else []),
        "llama-server TTFT p50 / p99 ms",
        "tokenwire TTFT p50 / p99 ms",
        *(["worker alone TTFT p50 ms"] if has_worker else []),
        "per-stream tok/s (ls / tw)",
        *(["llama-server own tok/s / TTFT p50 ms"] if has_own else []),
    ]
    lines = [
        "## Engine concurrency: tokenwire's llama_cpp worker beside llama-server",
        "",
        f"SmolLM2-135M Q4_1, {section['threads']} threads each, n_ctx {section['n_ctx']}, "
        f"{section['parallel']} parallel sequences (`--parallel` / `-np`), streams of {section['stream_tokens']} "
        f"tokens at temperature 0.7, closed loop, {section['window_s']:g} s per window, {rounds} interleaved "
        "round(s) (medians, the range over rounds in brackets). tokenwire end to end (REST bridge, gateway, "
        "worker)"
        + ("; tokenwire worker: the worker's own gRPC `Generate` stream, no gateway or bridge" if has_worker else "")
        + "; llama-server on its own OpenAI endpoint, asked to sample the whole vocabulary as tokenwire does"
        + (
            "; llama-server own: the same with its default sampler (top_k 40, top_p 0.95, min_p 0.05)"
            if has_own
            else ""
        )
        + ".",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    levels = next((by_level for by_level in runs.values() if by_level), {})  # any target measured
    for clients in levels:
        ls = _runs(runs.get("llama-server", {}).get(clients, []))
        tw = _runs(runs["tokenwire"][clients]) if clients in runs.get("tokenwire", {}) else []
        wk = _runs(runs["tokenwire-worker"][clients]) if has_worker and clients in runs["tokenwire-worker"] else []
        own = _runs(runs["llama-server-own"][clients]) if has_own and clients in runs["llama-server-own"] else []

        def agg(side: list[dict[str, Any]]) -> str:
            return _span([r["aggregate_tok_s"] for r in side]) if side else "-"

        def ratio(side: list[dict[str, Any]], ls: list[dict[str, Any]] = ls) -> str:
            # Round by round: each side against llama-server in the same round.
            pairs = [a["aggregate_tok_s"] / b["aggregate_tok_s"] for a, b in zip(side, ls, strict=False)]
            return _span(pairs, "{:.2f}") if pairs and all(b["aggregate_tok_s"] for b in ls) else "-"

        def ttft(side: list[dict[str, Any]], p99: bool = True) -> str:
            if not side:
                return "-"
            p50 = _span([r["ttft_p50_ms"] for r in side])
            return f"{p50} / {_span([r['ttft_p99_ms'] for r in side])}" if p99 else p50

        per_stream = (
            f"{statistics.median(r['stream_tok_s'] for r in ls):.0f} / "
            f"{statistics.median(r['stream_tok_s'] for r in tw):.0f}"
            if tw and ls
            else "-"
        )
        lines.append(
            f"| {clients} | {agg(ls)} | {agg(tw)} | {ratio(tw)} |"
            + (f" {agg(wk)} | {ratio(wk)} |" if has_worker else "")
            + f" {ttft(ls)} | {ttft(tw)} |"
            + (f" {ttft(wk, p99=False)} |" if has_worker else "")
            + f" {per_stream} |"
            + (f" {agg(own)} / {ttft(own, p99=False)} |" if has_own else "")
        )
    rss = section.get("peak_rss_mb", {})
    lines += [
        "",
        f"Peak RSS: tokenwire worker {rss.get('tokenwire-worker', 0):.0f} MB, "
        f"llama-server {rss.get('llama-server', 0):.0f} MB.",
        "",
    ]
    return "\n".join(lines)

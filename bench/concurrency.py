"""Engine concurrency: tokenwire's batching llama_cpp worker beside llama.cpp's own ``llama-server``.

Same GGUF (the embedded SmolLM2-135M Q4_1), same threads, same context and parallel
sequences, one run, side by side. N clients in a closed loop each stream chat
completions of exactly 128 tokens (temperature 0.7, a seed per request, the end
tokens banned by ``logit_bias`` so every stream is full length). For each server and
each N: aggregate tokens/s over the window, per-stream decode tokens/s, time to first
token p50/p99, and the server's peak RSS (``VmHWM``). tokenwire is measured end to
end (REST bridge, gateway, worker); llama-server answers its own OpenAI endpoint.

``llama-server`` is built once into ``bench/.cache`` from the llama-cpp-python sdist
(:mod:`llama_server`). Both run without weight repacking (``--no-repack``; tokenwire
loads with ``use_extra_bufts=False``): on this AMX machine ggml's AMX path crashed.

    .venv/bin/python bench/run.py --sections concurrency
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

import servers
from engine_raw import stream_timing
from llama_server import ensure_llama_server
from servers import Group

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


def one_stream(base: str, model: str, k: int) -> dict[str, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
        "max_tokens": STREAM_TOKENS,
        "temperature": 0.7,
        "seed": k,
        "logit_bias": EOG_BAN,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return stream_timing(base, body, timeout=600)


def closed_loop(base: str, model: str, clients: int, duration: float) -> dict[str, Any]:
    """``clients`` threads streaming back to back for ``duration`` s; streams that end in the window count."""
    records: list[dict[str, float]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + duration
    counter = iter(range(1 << 30))

    def client() -> None:
        while time.perf_counter() < stop_at:
            with lock:
                k = next(counter)
            record = one_stream(base, model, k)
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
         "--no-repack", "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
        ready_http=f"http://127.0.0.1:{port}/health",
    )  # fmt: skip
    group.start(server, timeout=120)
    server.address = f"127.0.0.1:{port}"
    return f"http://127.0.0.1:{port}"


def section_concurrency(args: argparse.Namespace, results: dict[str, Any]) -> None:
    from suite import project_eval, start_engine_stack, wait_quiet

    parallel = args.parallel
    threads = int(project_eval("from workers.engines.llama_cpp import default_threads; print(default_threads())"))
    gguf = project_eval("from workers.engines.llama_cpp import default_model_path; print(default_model_path())")
    n_ctx = 8192
    binary = str(ensure_llama_server(log=log))
    duration = max(args.duration, 4.0 if args.quick else 20.0)
    levels = CONCURRENCY[:2] if args.quick else CONCURRENCY
    section: dict[str, Any] = {
        "parallel": parallel,
        "threads": threads,
        "n_ctx": n_ctx,
        "stream_tokens": STREAM_TOKENS,
        "window_s": duration,
        "runs": {"tokenwire": {}, "llama-server": {}},
    }
    with Group() as group:
        _, worker, tw_base = start_engine_stack(
            group, "chat", "llama_cpp", "--parallel", str(parallel), "--n-ctx", str(n_ctx)
        )
        ls_base = start_llama_server(group, binary, gguf, threads, parallel, n_ctx)
        llama_proc = next(s for s in group.servers if s.name == "llama-server")
        targets = {"tokenwire": (tw_base, "chat"), "llama-server": (ls_base, "smollm2")}
        for base, model in targets.values():  # warm up: load pages, fill caches
            closed_loop(base, model, 2, 2.0)
        for clients in levels:
            for name, (base, model) in targets.items():
                noise = wait_quiet(max_wait=30)
                run = closed_loop(base, model, clients, duration)
                run["noise_before"] = noise
                section["runs"][name][str(clients)] = run
                log(
                    f"  {name:12s} {clients:2d} streams: {run['aggregate_tok_s']:6.1f} tok/s aggregate, "
                    f"{run['stream_tok_s']:5.1f} per stream, TTFT p50 {run['ttft_p50_ms']:6.0f} ms "
                    f"p99 {run['ttft_p99_ms']:6.0f} ms ({run['streams']} streams)"
                )
        section["peak_rss_mb"] = {
            "tokenwire-worker": peak_rss_mb(worker.process.pid),  # type: ignore[union-attr]
            "llama-server": peak_rss_mb(llama_proc.process.pid),  # type: ignore[union-attr]
        }
    results["concurrency"] = section


def render(section: dict[str, Any]) -> str:
    """The RESULTS.md part of this section."""
    lines = [
        "## Engine concurrency: tokenwire's llama_cpp worker beside llama-server",
        "",
        f"SmolLM2-135M Q4_1, {section['threads']} threads each, n_ctx {section['n_ctx']}, "
        f"{section['parallel']} parallel sequences (`--parallel` / `-np`), streams of {section['stream_tokens']} "
        f"tokens at temperature 0.7, closed loop, {section['window_s']:g} s per window. tokenwire end to end "
        "(REST bridge, gateway, worker); llama-server on its own OpenAI endpoint.",
        "",
        "| streams | llama-server tok/s | tokenwire tok/s | ratio | llama-server TTFT p50 / p99 | "
        "tokenwire TTFT p50 / p99 | per-stream tok/s (ls / tw) |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = section["runs"]
    for clients in runs["tokenwire"]:
        tw, ls = runs["tokenwire"][clients], runs["llama-server"][clients]
        ratio = tw["aggregate_tok_s"] / ls["aggregate_tok_s"] if ls["aggregate_tok_s"] else 0.0
        lines.append(
            f"| {clients} | {ls['aggregate_tok_s']:.0f} | {tw['aggregate_tok_s']:.0f} | {ratio:.2f} | "
            f"{ls['ttft_p50_ms']:.0f} / {ls['ttft_p99_ms']:.0f} ms | {tw['ttft_p50_ms']:.0f} / "
            f"{tw['ttft_p99_ms']:.0f} ms | {ls['stream_tok_s']:.0f} / {tw['stream_tok_s']:.0f} |"
        )
    rss = section.get("peak_rss_mb", {})
    lines += [
        "",
        f"Peak RSS: tokenwire worker {rss.get('tokenwire-worker', 0):.0f} MB, "
        f"llama-server {rss.get('llama-server', 0):.0f} MB.",
        "",
    ]
    return "\n".join(lines)

"""Figures out of ``results.json``: the stdout table, the report (RESULTS.generated.md) and results.png."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PATHS = [
    ("tokenwire/rest", "tokenwire REST bridge"),
    ("tokenwire/grpc", "tokenwire gateway (gRPC)"),
    ("tokenwire/worker", "echo worker direct (gRPC)"),
    ("fastchat/rest", "FastChat 0.2.36 REST"),
]
SHORT = {
    "tokenwire/rest": "tw REST",
    "tokenwire/grpc": "tw gateway",
    "tokenwire/worker": "worker direct",
    "fastchat/rest": "FastChat REST",
}
FRONT_LABEL = {
    "tokenwire/rest": "bridge + gateway",
    "tokenwire/grpc": "gateway",
    "tokenwire/worker": "worker",
    "fastchat/rest": "API server + controller",
}
MB = 1024  # /proc reports kB


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def cpu_per_request_ms(s: dict[str, Any]) -> float | None:
    return 1000 * s["front_cpu_s"] / s["requests"] if s.get("requests") else None


def cpu_per_chunk_us(s: dict[str, Any]) -> float | None:
    return 1e6 * s["front_cpu_s"] / s["chunks"] if s.get("chunks") else None


def worker_cpu_per_request_ms(s: dict[str, Any]) -> float | None:
    return 1000 * s["worker_cpu_s"] / s["requests"] if s.get("requests") else None


def client_cpu_per_request_ms(s: dict[str, Any]) -> float | None:
    return 1000 * s["client_cpu_s"] / s["requests"] if s.get("requests") else None


def one_line(s: dict[str, Any]) -> str:
    parts = [f"{s['rps']:.1f} req/s", f"p50 {fmt(s['p50_ms'], 2)} ms", f"p99 {fmt(s['p99_ms'], 2)} ms"]
    if s["kind"].startswith("stream"):
        parts += [f"{s['chunks_per_s']:.0f} chunks/s", f"TTFT p50 {fmt(s['ttft_p50_ms'], 2)} ms"]
        parts.append(f"server CPU {fmt(cpu_per_chunk_us(s))} us/chunk")
    else:
        parts.append(f"server CPU {fmt(cpu_per_request_ms(s), 3)} ms/req")
    parts.append(f"client CPU {fmt(client_cpu_per_request_ms(s), 3)} ms/req")
    if "other_share" in s:
        parts.append(f"other processes {100 * s['other_share']:.0f}% of the machine")
    if s["errors"]:
        parts.append(f"ERRORS {s['errors']}: {s['first_error']}")
    return ", ".join(parts)


# -- the figures ----------------------------------------------------------------------------


def figure_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, float | None]]]:
    """(figure, unit, {path: value}) for the side-by-side table."""
    sc = results["scenarios"]

    def values(load: str, fn: Any) -> dict[str, float | None]:
        return {path: (fn(sc[f"{path}/{load}"]) if f"{path}/{load}" in sc else None) for path, _ in PATHS}

    return [
        ("chat c1: requests/s", "req/s", values("chat_c1", lambda s: s["rps"])),
        ("chat c1: p50 latency", "ms", values("chat_c1", lambda s: s["p50_ms"])),
        ("chat c1: p99 latency", "ms", values("chat_c1", lambda s: s["p99_ms"])),
        ("chat c1: server CPU per request", "ms", values("chat_c1", cpu_per_request_ms)),
        ("chat c32: requests/s", "req/s", values("chat_c32", lambda s: s["rps"])),
        ("chat c32: p50 latency", "ms", values("chat_c32", lambda s: s["p50_ms"])),
        ("chat c32: p99 latency", "ms", values("chat_c32", lambda s: s["p99_ms"])),
        ("chat c32: server CPU per request", "ms", values("chat_c32", cpu_per_request_ms)),
        ("stream c8: SSE chunks/s", "chunks/s", values("stream_c8", lambda s: s["chunks_per_s"])),
        ("stream c8: streams/s", "req/s", values("stream_c8", lambda s: s["rps"])),
        ("stream c8: tokens streamed/s", "tokens/s", values("stream_c8", tokens_per_s)),
        (
            "stream c8: SSE chunks per stream",
            "chunks",
            values("stream_c8", lambda s: s["chunks"] / s["requests"] if s["requests"] else None),
        ),
        ("stream c8: time to first token p50", "ms", values("stream_c8", lambda s: s["ttft_p50_ms"])),
        ("stream c8: time to first token p99", "ms", values("stream_c8", lambda s: s["ttft_p99_ms"])),
        ("stream c8: server CPU per chunk", "us", values("stream_c8", cpu_per_chunk_us)),
        ("stream c8: server CPU per token", "us", values("stream_c8", cpu_per_token_us)),
        ("paced stream c8: SSE chunks/s", "chunks/s", values("stream_paced_c8", lambda s: s["chunks_per_s"])),
        ("paced stream c8: tokens streamed/s", "tokens/s", values("stream_paced_c8", tokens_per_s)),
        (
            "paced stream c8: SSE chunks per stream",
            "chunks",
            values("stream_paced_c8", lambda s: s["chunks"] / s["requests"] if s["requests"] else None),
        ),
        ("paced stream c8: time to first token p50", "ms", values("stream_paced_c8", lambda s: s["ttft_p50_ms"])),
        ("paced stream c8: time to first token p99", "ms", values("stream_paced_c8", lambda s: s["ttft_p99_ms"])),
        ("paced stream c8: server CPU per chunk", "us", values("stream_paced_c8", cpu_per_chunk_us)),
        ("paced stream c8: server CPU per token", "us", values("stream_paced_c8", cpu_per_token_us)),
        ("embed c8 (32 inputs): requests/s", "req/s", values("embed_c8", lambda s: s["rps"])),
        ("embed c8: p50 latency", "ms", values("embed_c8", lambda s: s["p50_ms"])),
        ("embed c8: p99 latency", "ms", values("embed_c8", lambda s: s["p99_ms"])),
        ("embed c8: server CPU per request", "ms", values("embed_c8", cpu_per_request_ms)),
    ]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def peak_rss_mb(results: dict[str, Any], stack: str, names: list[str]) -> float | None:
    memory = results.get("memory", {}).get(stack)
    if not memory or not all(n in memory for n in names):
        return None
    return sum(memory[n]["VmHWM"] for n in names) / MB


def tokens_per_s(s: dict[str, Any]) -> float | None:
    return s["rps"] * s["tokens_per_stream"] if s.get("tokens_per_stream") else None


def cpu_per_token_us(s: dict[str, Any]) -> float | None:
    tokens = s["requests"] * s.get("tokens_per_stream", 0)
    return 1e6 * s["front_cpu_s"] / tokens if tokens else None


TARGETS = [
    # (name, unit, load, figure, want, bound)
    ("non-streamed chat (c32): server CPU per request", "ms", "chat_c32", cpu_per_request_ms, "<=", 0.1),
    ("non-streamed chat (c32): requests/s", "req/s", "chat_c32", lambda s: s["rps"], ">=", 5),
    ("streamed chat (c8): server CPU per SSE chunk", "us", "stream_c8", cpu_per_chunk_us, "<=", 0.1),
    ("streamed chat (c8): server CPU per token streamed", "us", "stream_c8", cpu_per_token_us, "<=", 0.1),
    ("streamed chat (c8): SSE chunks/s", "chunks/s", "stream_c8", lambda s: s["chunks_per_s"], ">=", 10),
    ("streamed chat (c8): tokens streamed/s", "tokens/s", "stream_c8", tokens_per_s, ">=", 10),
    ("streamed chat (c8): time to first token (p50)", "ms", "stream_c8", lambda s: s["ttft_p50_ms"], "<=", 0.1),
    ("paced stream (c8, 1 ms/token): server CPU per SSE chunk", "us", "stream_paced_c8", cpu_per_chunk_us, "<=", 0.1),
    ("paced stream (c8, 1 ms/token): server CPU per token", "us", "stream_paced_c8", cpu_per_token_us, "<=", 0.1),
    (
        "paced stream (c8, 1 ms/token): SSE chunks/s",
        "chunks/s",
        "stream_paced_c8",
        lambda s: s["chunks_per_s"],
        ">=",
        10,
    ),
    (
        "paced stream (c8, 1 ms/token): time to first token (p50)",
        "ms",
        "stream_paced_c8",
        lambda s: s["ttft_p50_ms"],
        "<=",
        0.1,
    ),
    ("embeddings, 32 inputs (c8): requests/s", "req/s", "embed_c8", lambda s: s["rps"], ">=", 10),
]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    sc = results["scenarios"]
    out = []

    def value(path: str, load: str, fn: Any) -> float | None:
        s = sc.get(f"{path}/{load}")
        return fn(s) if s and s.get("requests") else None

    for name, unit, load, fn, want, bound in TARGETS:
        tw, fc = value("tokenwire/rest", load, fn), value("fastchat/rest", load, fn)
        r = ratio(tw, fc)
        met = None if r is None else (r <= bound if want == "<=" else r >= bound)
        out.append(
            {"target": name, "unit": unit, "tokenwire": tw, "fastchat": fc, "ratio": r, "want": f"{want} {bound:g}"}
        )
        out[-1]["met"] = met
    rss = peak_rss_mb(results, "tokenwire", ["tw-bridge", "tw-gateway"])
    out.append(
        {
            "target": "bridge + gateway peak RSS (VmHWM) under these loads",
            "unit": "MB",
            "tokenwire": rss,
            "fastchat": peak_rss_mb(results, "fastchat", ["fastchat-api-server", "fastchat-controller"]),
            "ratio": None,
            "want": "<= 150 MB",
            "met": None if rss is None else rss <= 150,
        }
    )
    return out


def met_text(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**not met**")


# -- stdout ------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = ["", "=" * 118]
    head = f"{'figure':40} {'unit':>8} " + " ".join(f"{SHORT[p]:>15}" for p, _ in PATHS) + f" {'tw/FC':>7}"
    lines += [head, "-" * len(head)]
    for figure, unit, values in figure_rows(results):
        cells = " ".join(f"{fmt(values[p], 2):>15}" for p, _ in PATHS)
        r = ratio(values["tokenwire/rest"], values["fastchat/rest"])
        lines.append(f"{figure[:40]:40} {unit:>8} {cells} {fmt(r, 3):>7}")
    lines += ["", "targets (tokenwire REST vs FastChat REST):"]
    for t in targets(results):
        lines.append(
            f"  {t['target']:52} tokenwire {fmt(t['tokenwire'], 2):>9} FastChat {fmt(t['fastchat'], 2):>9} "
            f"ratio {fmt(t['ratio'], 3):>7} want {t['want']:9} -> {met_text(t['met']).strip('*')}"
        )
    engines = results.get("engines")
    if engines:
        lines += ["", "engines:"]
        lines += ["  " + row for row in engine_lines(engines)]
    lines.append(f"total run time: {results.get('total_s', 0):.0f} s")
    return "\n".join(lines)


def _median(runs: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def engine_lines(engines: dict[str, Any]) -> list[str]:
    if "skipped" in engines:
        return [f"skipped: {engines['skipped']}"]
    out = []
    rows = [
        ("llama-cpp-python create_chat_completion (in-process)", engines.get("llama_raw", {}).get("high_level")),
        ("llama-cpp-python eval + native sampler (in-process)", engines.get("llama_raw", {}).get("low_level")),
        ("tokenwire REST bridge (SSE)", engines.get("llama_tokenwire_rest")),
        ("tokenwire gateway (gRPC stream)", engines.get("llama_tokenwire_grpc")),
        ("tokenwire worker alone (its gRPC stream)", engines.get("llama_tokenwire_worker")),
    ]
    for label, runs in rows:
        if runs:
            out.append(
                f"SmolLM2 {label:55} TTFT {fmt(1000 * (_median(runs, 'ttft_s') or 0), 1):>7} ms  "
                f"decode {fmt(_median(runs, 'decode_tok_s'), 1):>6} tok/s  end-to-end {fmt(_median(runs, 'e2e_tok_s'), 1):>6} "
                f"tok/s  tokens {fmt(_median(runs, 'tokens'), 0)}"
            )
    raw, tw = engines.get("embed_raw"), engines.get("embed_tokenwire")
    if raw and tw:
        for clients in (1, 8):
            r = raw.get(f"clients_{clients}", {}).get("embeddings_per_s")
            t = tw.get(f"clients_{clients}", {}).get("embeddings_per_s")
            out.append(
                f"MiniLM embeddings/s, {clients} client(s): in-process {fmt(r)}  tokenwire REST {fmt(t)}  "
                f"ratio {fmt(ratio(t, r), 2)}"
            )
    for key in ("llama_error", "embed_error"):
        if key in engines:
            out.append(f"{key}: {engines[key][:300]}")
    return out


# -- RESULTS.generated.md --------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    settings = results["settings"]
    sc = results["scenarios"]
    md: list[str] = []
    md.append("# tokenwire benchmark: the latest recorded run\n")
    md.append(
        "Written by `make bench`, which replaces this file at each full run: what the figures mean, the runs "
        "before this one and the one-off experiments are in [RESULTS.md](RESULTS.md).\n"
    )
    md.append(
        f"Recorded {env['date']} by `make bench` (`python -m bench.run`"
        + (" --quick" if settings["quick"] else "")
        + f"), tokenwire at `{env['tokenwire_commit']}`; total run time {results.get('total_s', 0):.0f} s"
        + (
            f" (sections {', '.join(settings['sections'])}; merged with a run of {settings['merged_from']})"
            if settings.get("merged_from")
            else ""
        )
        + ". "
        "Rerun with `make bench`; `.venv/bin/python -m bench.run --quick` is a 2-minute smoke run.\n"
    )
    md.append("## The machine and the method\n")
    md.append(
        f"- CPU: {env['cpu']}, {env['cores']} cores ({env['affinity']} usable), {env['memory_gb']} GB RAM, "
        f"Linux {env['kernel']}, Python {env['python']}."
    )
    pp = env["project_packages"]
    md.append(
        "- tokenwire's stack (project `.venv`): "
        + ", ".join(f"{k} {v}" for k, v in pp.items() if v and k != "python")
        + "."
    )
    bp = env["bench_packages"]
    md.append(
        "- FastChat and the load client (`bench/.venv`): " + ", ".join(f"{k} {v}" for k, v in bp.items() if v) + "."
    )
    md.append(
        f"- Closed loop: N clients, each sending its next request when the previous one is answered; "
        f"{settings['warmup_s']:g} s of warm-up, then a {settings['duration_s']:g} s window per scenario. "
        "Only requests completed inside the window count. Latency is per request at the client; the time to "
        "first token is from sending the request to the first SSE event (gRPC message) with non-empty content."
    )
    md.append(
        "- **The front end** in this REST section is the bridge and the gateway as two processes (`tokenwire "
        "serve --split-front-end`), so that each part can be measured; `tokenwire serve`'s default, one process, "
        "is measured against it with `bench/experiments/front_end_variants.py --ceiling` (in RESULTS.md, engine "
        "concurrency)."
    )
    md.append(
        "- **Server CPU** is read from `/proc/<pid>/stat` (utime + stime, all threads) of each server process at "
        "the start and end of the window, divided by the requests (SSE chunks, tokens) completed in it. For the "
        "REST paths it is the front end only: tokenwire's bridge + gateway, FastChat's API server + controller; "
        "workers are listed apart. SSE chunks are every `data:` event but `[DONE]` (gRPC: every message)."
    )
    md.append(
        "- **2 cores for everything**: the client (one asyncio process: aiohttp, grpc.aio, uvloop), the front "
        "end and the workers share them, so throughput figures are bounded by the sum of everyone's CPU. "
        "The CPU-per-request figures are the ones that travel to bigger machines. The client's own CPU per "
        "request is in the detail table below."
    )
    md.append(
        "- **Other processes**: the machine's busy CPU (`/proc/stat`) minus the servers' and the client's is "
        "what other processes used in the window (other sessions' test runs share this machine). A window "
        "where they used more than 10% of the machine is measured again, after waiting for quiet, up to 3 "
        "times; the quietest attempt is kept and its share is in the detail table. The engine figures are "
        "guarded the same way."
    )
    md.append(
        "- Loads: non-streamed chat, `max_tokens` 16, at 1 and 32 clients; streamed chat, `max_tokens` 256, "
        "at 8 clients; embeddings, 32 inputs of ~10 words per request, at 8 clients. tokenwire runs echo "
        "workers (`--engine echo --echo-tokens 256 --echo-delay 0`; `--echo-kind embedding "
        "--echo-dimensions 384`); FastChat runs over `bench/fake_fastchat_worker.py`, which speaks FastChat's "
        "worker protocol and answers instantly with the same token counts (one cumulative-text chunk per "
        "token, like FastChat's vLLM worker). Both kinds of worker admit 64+ requests at once, so no load "
        "queues on a worker. FastChat runs as shipped (`python -m fastchat.serve.openai_api_server`, uvicorn "
        "access log at INFO); tokenwire's bridge has no access log. FastChat splits 32 embedding inputs into "
        "8 sequential worker calls (`FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE`=4, its default), each preceded "
        "by a controller round trip.\n"
    )
    for name in ("tokenwire", "fastchat"):
        if name in results["validation"]:
            md.append(f"Checked before timing ({name}): {results['validation'][name]}.")
    md.append("")

    md.append("## Targets: tokenwire (REST bridge) against FastChat (REST)\n")
    md.append(
        "Every ratio uses FastChat as measured in the same run, on the same machine, by the same client. "
        "The server CPU of each side is its front end (tokenwire: bridge + gateway; FastChat: API server + "
        "controller).\n"
    )
    md.append("| target | tokenwire | FastChat | tokenwire / FastChat | wanted | |")
    md.append("|---|---:|---:|---:|---|---|")
    for t in targets(results):
        md.append(
            f"| {t['target']} | {fmt(t['tokenwire'], 2)} {t['unit']} | {fmt(t['fastchat'], 2)} {t['unit']} | "
            f"{fmt(t['ratio'], 3)} | {t['want']} | {met_text(t['met'])} |"
        )
    md.append("")
    md.append(
        "Streams: *streamed chat* is the load as specified, on an instant engine (`--echo-delay 0`); *paced "
        "stream* is the same load on an engine making one token per millisecond (`--echo-delay 0.001`, the "
        "fake FastChat worker `--delay 0.001`), which keeps every token its own message and SSE chunk and so "
        "measures the per-token path; its throughput is bounded by the pace (8 streams x ~1000 tokens/s). "
        "FastChat sends one SSE chunk per token. tokenwire's worker may group the tokens made while its "
        "previous message was being sent into one message (an engine faster than the wire, like the echo "
        "engine, then streams fewer, larger chunks), so per-chunk and per-token figures differ for it: "
        "both are given. Every stream carries the same 256 tokens (checked before timing).\n"
    )
    md.append("![throughput and server CPU per request, log scale](results.png)\n")

    md.append("## Every figure, side by side\n")
    md.append(
        "Ratios are tokenwire REST / FastChat REST. Server CPU covers "
        + "; ".join(f"{label}: {FRONT_LABEL[path]}" for path, label in PATHS)
        + ".\n"
    )
    md.append("| figure | unit | " + " | ".join(label for _, label in PATHS) + " | tokenwire REST / FastChat |")
    md.append("|---|---|" + "---:|" * (len(PATHS) + 1))
    for figure, unit, values in figure_rows(results):
        r = ratio(values["tokenwire/rest"], values["fastchat/rest"])
        md.append(f"| {figure} | {unit} | " + " | ".join(fmt(values[p], 2) for p, _ in PATHS) + f" | {fmt(r, 3)} |")
    md.append("")

    interval = sc.get("tokenwire/rest/stream_paced_interval_c8")
    every = sc.get("tokenwire/rest/stream_paced_c8")
    if interval and every:
        md.append(interval_markdown(every, interval))
    md.append("### Detail per scenario\n")
    md.append(
        "| scenario | clients | requests | errors | req/s | chunks/s | front CPU s | worker CPU s | "
        "worker CPU ms/req | client CPU ms/req | other processes' CPU | attempts |"
    )
    md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in sc.items():
        md.append(
            f"| {name} | {s['concurrency']} | {s['requests']} | {s['errors']} | {fmt(s['rps'])} | "
            f"{fmt(s['chunks_per_s']) if s['kind'].startswith('stream') else ''} | {s['front_cpu_s']:.2f} | "
            f"{s['worker_cpu_s']:.2f} | {fmt(worker_cpu_per_request_ms(s), 3)} | "
            f"{fmt(client_cpu_per_request_ms(s), 3)} | {100 * s.get('other_share', 0):.0f}% | {s.get('attempts', 1)} |"
        )
    errors = [f"- {n}: {s['first_error']}" for n, s in sc.items() if s["errors"]]
    if errors:
        md += ["", "Errors seen:", *errors]
    md.append("")

    md.append("### Memory (VmHWM = peak RSS, VmRSS = at the end of the loads)\n")
    md.append("| process | VmHWM MB | VmRSS MB |")
    md.append("|---|---:|---:|")
    for stack in ("tokenwire", "fastchat"):
        for proc, mem in results.get("memory", {}).get(stack, {}).items():
            md.append(f"| {proc} | {mem.get('VmHWM', 0) / MB:.1f} | {mem.get('VmRSS', 0) / MB:.1f} |")
    md.append("")

    md.append("## Engine path: tokenwire against the same engine in-process\n")
    engines = results.get("engines")
    if not engines:
        md.append("Not run (`--sections` left it out).\n")
    elif "skipped" in engines:
        md.append(f"Skipped: {engines['skipped']}.\n")
    else:
        md.append(engine_markdown(engines))

    if results.get("floor"):
        md.append(floor_markdown(results["floor"]))
    if results.get("profiles"):
        md.append(profile_markdown(results["profiles"]))
    return "\n".join(md) + "\n"


def floor_markdown(floor: dict[str, Any]) -> str:
    md = ["## The floor: an empty grpc.aio server on this machine\n"]
    if "error" in floor:
        return "\n".join([*md, f"**failed**: `{floor['error'][:1000]}`\n"])
    md.append(
        f"`bench/grpc_floor.py`: a uvloop grpc.aio server whose handlers do nothing, driven by "
        f"{floor.get('concurrency')} concurrent grpc.aio clients in another process; CPU per call from "
        "`/proc` (server) and `getrusage` (client). Every tokenwire hop pays at least this: a non-streamed "
        "REST request is a unary call (bridge client, gateway server) plus a one-message stream (gateway "
        "client, worker server), before any HTTP, JSON or application work. Three pass-through interceptors "
        "stand for tokenwire's three (request id, auth, errors).\n"
    )
    md.append("| call | interceptors | calls/s | server CPU us/call | client CPU us/call |")
    md.append("|---|---:|---:|---:|---:|")
    labels = {"unary": "unary", "stream_1": "stream of 1 message", "stream_2": "stream of 2 messages"}
    for row in floor.get("shapes", {}).values():
        md.append(
            f"| {labels.get(row['shape'], row['shape'])} | {row['interceptors']} | {fmt(row['calls_per_s'])} | "
            f"{fmt(row['server_us_per_call'])} | {fmt(row['client_us_per_call'])} |"
        )
    md.append("")
    return "\n".join(md)


def interval_markdown(every: dict[str, Any], interval: dict[str, Any]) -> str:
    n = interval.get("stream_interval")
    md = [f"### Worker `--stream-interval {n}`: the paced stream through the bridge\n"]
    md.append(
        f"The paced load (8 clients, one token per ms) from a worker run with `--stream-interval {n}`: after "
        f"the first token, each message carries at least {n} tokens, so the gateway and the bridge handle "
        f"fewer messages per token; the stream is less smooth (tokens arrive {n} at a time).\n"
    )
    md.append(
        "| worker | SSE chunks/s | tokens/s | chunks per stream | TTFT p50 ms | server CPU us/token | "
        "worker CPU us/token |"
    )
    md.append("|---|---:|---:|---:|---:|---:|---:|")
    for label, s in (("`--stream-interval 1` (default)", every), (f"`--stream-interval {n}`", interval)):
        tokens = s["requests"] * s.get("tokens_per_stream", 0)
        worker_us = 1e6 * s["worker_cpu_s"] / tokens if tokens else None
        chunks = s["chunks"] / s["requests"] if s["requests"] else None
        md.append(
            f"| {label} | {fmt(s['chunks_per_s'])} | {fmt(tokens_per_s(s))} | {fmt(chunks)} | "
            f"{fmt(s['ttft_p50_ms'])} | {fmt(cpu_per_token_us(s))} | {fmt(worker_us)} |"
        )
    md.append("")
    return "\n".join(md)


def engine_markdown(engines: dict[str, Any]) -> str:
    md: list[str] = []
    setup = engines.get("setup", {})
    raw = engines.get("llama_raw", {})
    md.append(
        f"SmolLM2-135M-Instruct ({setup.get('gguf')}), n_ctx {setup.get('n_ctx')}, {setup.get('threads')} threads "
        f"for generation and prompt evaluation everywhere, greedy (temperature 0), {setup.get('max_tokens')} new "
        f"tokens, end-of-generation tokens {raw.get('eog_tokens')} banned with `logit_bias` -100 (the high-level "
        "llama-cpp-python call runs without the ban, since its `logit_bias` is a Python logits processor that "
        "costs 5x the generation speed here; greedy decoding of this prompt makes the full 128 tokens "
        "anyway, as the token column shows). Each run has a prompt of its own (`Request <k>. Write a long "
        f"story about a robot who learns to paint.`, {raw.get('prompt_tokens')} tokens with the template) and "
        "the raw runs reset the KV cache, so every run evaluates its whole prompt (tokenwire's engine reuses "
        "cached 32-token chunks of an identical prefix). The in-process model stays loaded in its own "
        "process beside tokenwire's worker, and the paths run in interleaved rounds (in-process, worker, "
        "gateway, bridge, again), so every path sees the same machine. Medians of the runs; one client, one "
        "sequence at a time. The time to first token includes prompt evaluation (about 170 ms for this "
        "prompt), where tokenwire evaluates aligned 32-token chunks (32 + 14 tokens here, one batch of 46 "
        "in-process).\n"
    )
    md.append(
        "| SmolLM2 path | TTFT ms | decode tok/s | end-to-end tok/s | tokens | decode vs in-process eval loop "
        "| other processes' CPU |"
    )
    md.append("|---|---:|---:|---:|---:|---:|---:|")
    base = _median(raw.get("low_level") or [], "decode_tok_s")
    for label, runs in (
        ("llama-cpp-python `create_chat_completion(stream=True)`, in-process", raw.get("high_level")),
        ("llama-cpp-python `eval` + native sampler loop, in-process", raw.get("low_level")),
        ("tokenwire: REST bridge (SSE) → gateway → worker", engines.get("llama_tokenwire_rest")),
        ("tokenwire: gateway (gRPC stream) → worker", engines.get("llama_tokenwire_grpc")),
        ("tokenwire: worker alone (its `Generate` stream)", engines.get("llama_tokenwire_worker")),
    ):
        if not runs:
            continue
        decode = _median(runs, "decode_tok_s")
        md.append(
            f"| {label} | {fmt(1000 * (_median(runs, 'ttft_s') or 0))} | {fmt(decode)} | "
            f"{fmt(_median(runs, 'e2e_tok_s'))} | {fmt(_median(runs, 'tokens'), 0)} | {fmt(ratio(decode, base), 3)} "
            f"| {noise(runs, raw)} |"
        )
    md.append("")
    raw_e, tw_e = engines.get("embed_raw"), engines.get("embed_tokenwire")
    if raw_e and tw_e:
        md.append(
            f"all-MiniLM-L6-v2, requests of {raw_e.get('inputs')} sentences (~16 tokens each), "
            f"{raw_e.get('threads')} torch threads. In-process: transformers forward + masked mean pooling + L2 "
            "normalisation + `tolist()`, one call per request, from 1 or 8 threads. tokenwire: `POST "
            "/v1/embeddings` through the bridge, the gateway and an `--engine embeddings` worker (which "
            "micro-batches concurrent requests).\n"
        )
        md.append(
            "| clients | in-process embeddings/s | tokenwire embeddings/s | tokenwire / in-process | tokenwire p50 ms "
            "| other processes' CPU (in-process / tokenwire) |"
        )
        md.append("|---:|---:|---:|---:|---:|---:|")
        for clients in (1, 8):
            r = raw_e.get(f"clients_{clients}", {})
            t = tw_e.get(f"clients_{clients}", {})
            md.append(
                f"| {clients} | {fmt(r.get('embeddings_per_s'))} | {fmt(t.get('embeddings_per_s'))} | "
                f"{fmt(ratio(t.get('embeddings_per_s'), r.get('embeddings_per_s')), 2)} | {fmt(t.get('p50_ms'))} "
                f"| {100 * raw_e.get('other_share', 0):.0f}% / {100 * t.get('other_share', 0):.0f}% |"
            )
        md.append("")
    for key in ("llama_error", "embed_error"):
        if key in engines:
            md.append(f"**{key}**: `{engines[key][:1000]}`\n")
    return "\n".join(md)


def noise(runs: list[dict[str, Any]], raw: dict[str, Any]) -> str:
    shares = [r["other_share"] for r in runs if "other_share" in r]
    if not shares and "other_share" in raw and runs in (raw.get("high_level"), raw.get("low_level")):
        shares = [raw["other_share"]]
    return f"{100 * max(shares):.0f}%" if shares else "n/a"


def profile_markdown(profiles: dict[str, Any]) -> str:
    md = ["## Profiles of the hot path (py-spy)\n"]
    md.append(
        "py-spy (`record --format raw --nonblocking`, 250 Hz) on the bridge and the gateway while the REST load "
        "runs (a separate run after the measured windows). Self = the function was on top of the Python stack; "
        "library = the leaf frame's package. Python threads only: gRPC's C-core threads are not sampled.\n"
    )
    for load in ("chat_c32", "stream_c8", "stream_paced_c8"):
        for proc in ("tw-bridge", "tw-gateway"):
            p = profiles.get(f"{proc}/{load}")
            if not p or not p.get("samples"):
                continue
            md.append(f"### {proc} under REST {load} ({p['samples']} samples)\n")
            md.append("| self % | function |")
            md.append("|---:|---|")
            md += [f"| {share:.1f} | `{name}` |" for name, share in p["self"][:12]]
            md.append("")
            md.append("By library (self): " + ", ".join(f"{name} {share:.1f}%" for name, share in p["libraries"][:10]))
            md.append("")
            native = profiles.get(f"{proc}/{load}/native")
            if native and native.get("samples"):
                md.append(
                    f"With native frames (py-spy `--native`, {native['samples']} busy samples; "
                    f"{native.get('idle_samples', 0)} samples waiting in epoll left out), by library (self): "
                    + ", ".join(f"{name} {share:.1f}%" for name, share in native["libraries"][:10])
                    + "; top native leaves: "
                    + ", ".join(f"`{name}` {share:.1f}%" for name, share in native["self"][:8])
                )
                md.append("")
            if p.get("project_inclusive"):
                md.append(
                    "Project functions, inclusive: "
                    + ", ".join(f"`{name}` {share:.1f}%" for name, share in p["project_inclusive"][:8])
                )
                md.append("")
    return "\n".join(md)


# -- results.png -------------------------------------------------------------------------------------


def chart(results: dict[str, Any], target: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sc = results["scenarios"]
    if not sc:
        return None
    groups = [
        ("chat c1\nreq/s", "chat_c1", lambda s: s["rps"], cpu_per_request_ms, "ms/req"),
        ("chat c32\nreq/s", "chat_c32", lambda s: s["rps"], cpu_per_request_ms, "ms/req"),
        ("stream c8\ntokens/s", "stream_c8", tokens_per_s, cpu_per_token_us, "µs/token"),
        ("paced stream c8\ntokens/s (1 per SSE chunk)", "stream_paced_c8", tokens_per_s, cpu_per_token_us, "µs/token"),
        ("embed c8 (32 inputs)\nreq/s", "embed_c8", lambda s: s["rps"], cpu_per_request_ms, "ms/req"),
    ]
    colors = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#d62728"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.16
    for panel, (ax, title) in enumerate(
        zip(
            axes,
            ["Throughput (higher is better)", "Server CPU per request / streamed token (lower is better)"],
            strict=True,
        )
    ):
        for k, (path, label) in enumerate(PATHS):
            xs, ys = [], []
            for g, (_, load, thr, cpu, _) in enumerate(groups):
                s = sc.get(f"{path}/{load}")
                value = (thr if panel == 0 else cpu)(s) if s else None
                if value:
                    xs.append(g + (k - (len(PATHS) - 1) / 2) * width)
                    ys.append(value)
            bars = ax.bar(
                xs, ys, width, label=label + ("" if panel == 0 else f" ({FRONT_LABEL[path]})"), color=colors[k]
            )
            for bar, y in zip(bars, ys, strict=True):
                ax.annotate(
                    fmt(y, 2),
                    (bar.get_x() + bar.get_width() / 2, y),
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 5)  # room for the value labels
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] if panel == 0 else g[0].split("\n")[0] + f"\n{g[4]}" for g in groups], fontsize=8.5)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.25)
        ax.legend(fontsize=7.5, loc="lower left" if panel == 0 else "upper left")
    env = results["environment"]
    fig.suptitle(
        f"tokenwire vs FastChat 0.2.36 on echo / fake workers — {env['cpu']}, {env['cores']} cores shared by "
        f"client and servers — {env['date']}",
        fontsize=9.5,
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target

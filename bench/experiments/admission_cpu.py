"""What refusing an oversized prompt costs: gateway and worker CPU for a 6 MB prompt.

Starts a gateway, the real llama_cpp worker (the embedded SmolLM2, context 8,192)
and the REST bridge, then sends 6 MB prompts that cannot fit: a chat and a text
completion over gRPC (the generated stubs), and a chat through the bridge
(a 6 MB body, under its 10 MiB limit). For each it reads the CPU (utime + stime
from /proc) of the gateway and the worker before and after, and the answer.

    .venv/bin/python -m bench.experiments.admission_cpu [--mb 6] [--text prose|letters]

Figures are recorded in bench/RESULTS.md ("Refusing what cannot fit").
"""

from __future__ import annotations

import argparse
import json
import random
import time
import urllib.error
import urllib.request

import grpc

from bench.servers import Group, tokenwire
from tokenwire.v1 import api_pb2, api_pb2_grpc, common_pb2

MODEL = "smollm2-135m-instruct"


def grpc_case(stub: api_pb2_grpc.InferenceServiceStub, kind: str, text: str) -> str:
    try:
        if kind == "chat":
            stub.CreateChatCompletion(
                api_pb2.CreateChatCompletionRequest(
                    model=MODEL, messages=[common_pb2.ChatMessage(role="user", content=text)], max_tokens=1
                ),
                timeout=600,
            )
        else:
            stub.CreateCompletion(
                api_pb2.CreateCompletionRequest(model=MODEL, prompt=[common_pb2.TextOrTokens(text=text)], max_tokens=1),
                timeout=600,
            )
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()[:90]}"  # type: ignore[attr-defined]
    return "OK (not refused)"


def rest_case(url: str, text: str) -> str:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            return f"{reply.status} (not refused)"
    except urllib.error.HTTPError as error:
        payload = json.loads(error.read())["error"]
        return f"{error.code} {payload['code']}: {payload['message'][:80]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=6.0, help="prompt size in MB (10^6 bytes)")
    parser.add_argument(
        "--text",
        choices=("prose", "letters"),
        default="prose",
        help="a repeated sentence, or random letters and spaces",
    )
    args = parser.parse_args()
    size = int(args.mb * 1e6)
    if args.text == "prose":
        text = ("All work and no play makes Jack a dull boy. " * (size // 44 + 1))[:size]
    else:
        rng = random.Random(0)
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz  ") for _ in range(size))
    with Group() as group:
        gateway = group.start(tokenwire("gateway", "gateway", "--port", "0", "--log-level", "warning"))
        group.start(
            tokenwire(
                "worker",
                "worker",
                "--port",
                "0",
                "--engine",
                "llama_cpp",
                "--controller-address",
                gateway.address,
                "--heartbeat-interval",
                "0.5",
                "--log-level",
                "warning",
            )
        )
        bridge = group.start(tokenwire("bridge", "bridge", "--port", "0", "--gateway-address", gateway.address))
        url = f"http://{bridge.address}"
        with grpc.insecure_channel(
            gateway.address,
            options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
        ) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(m.id == MODEL for m in stub.ListModels(api_pb2.ListModelsRequest(), timeout=5).data):
                    break
                time.sleep(0.2)
            print(f"{len(text.encode()) / 1e6:.1f} MB prompt ({args.text}), context 8192, max_tokens 1")
            print(f"{'case':<24} {'gateway CPU':>12} {'worker CPU':>11} {'bridge CPU':>11}  answer")
            cases = [
                ("gRPC chat", lambda: grpc_case(stub, "chat", text)),
                ("gRPC completion", lambda: grpc_case(stub, "completion", text)),
                ("REST chat (bridge)", lambda: rest_case(url, text)),
            ]
            for name, run in cases:
                time.sleep(1.0)  # heartbeats and the like settle
                before = group.cpu()
                answer = run()
                after = group.cpu()
                used = {k: (after[k] - before[k]) * 1000 for k in after}
                print(
                    f"{name:<24} {used['gateway']:>9.0f} ms {used['worker']:>8.0f} ms "
                    f"{used['bridge']:>8.0f} ms  {answer}"
                )


if __name__ == "__main__":
    main()

"""What every part of tokenwire uses, and imports no part: the OpenAI error model and its
gRPC mapping, gRPC server/channel/TLS plumbing and the cluster credentials check, request
ids and logging.

Importing it also chooses grpc's I/O engine for this process, since grpc reads that from the
environment only when it is first imported, and every part imports this package before grpc.
"""

import os

# grpc's classic epoll poller instead of its newer event engine: each streamed message then hops
# between fewer threads (5 context switches a message in a gRPC relay against 10), and the
# one-process front end spends about 0.6x the CPU a streamed chunk and 0.9x a non-streamed request
# (bench/RESULTS.md, "grpc's classic poller"). An experiment GRPC_EXPERIMENTS already names is left
# as the user set it.
CLASSIC_POLLING = ("event_engine_client", "event_engine_listener", "event_engine_for_all_other_endpoints")


def _use_classic_polling() -> None:
    chosen = [name for name in os.environ.get("GRPC_EXPERIMENTS", "").split(",") if name]
    named = {name.lstrip("-") for name in chosen}
    added = [f"-{name}" for name in CLASSIC_POLLING if name not in named]
    if added:
        os.environ["GRPC_EXPERIMENTS"] = ",".join(chosen + added)


_use_classic_polling()

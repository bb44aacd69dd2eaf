"""What every part of tokenwire uses, and imports no part: the OpenAI error model and its
gRPC mapping, gRPC server/channel/TLS plumbing and the cluster credentials check, request
ids and logging."""

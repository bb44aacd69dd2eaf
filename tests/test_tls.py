"""TLS on the gateway's gRPC port and on gateway <-> worker channels, with a
certificate the test makes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import openai
import pytest

from tests import harness
from tokenwire.v1 import api_pb2, api_pb2_grpc


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_tls_end_to_end(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    tls_server = ("--tls-cert", cert, "--tls-key", key)
    # The self-signed certificate is its own CA.
    gateway = harness.gateway(*tls_server, "--tls-ca", cert)
    worker = harness.worker(
        gateway.address, "--engine", "echo", "--model-name", "echo-tls", *tls_server, "--tls-ca", cert
    )
    bridge = harness.bridge(gateway.address, "--tls-ca", cert)
    url = f"http://{bridge.address}"
    try:
        harness.wait_for_workers(url, "echo-tls", 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="echo-tls", messages=[{"role": "user", "content": "secret"}], max_tokens=1
        )
        assert reply.choices[0].message.content == "secret"

        # A TLS client with the CA is served; a plaintext one is not.
        credentials = grpc.ssl_channel_credentials(Path(cert).read_bytes())
        with grpc.secure_channel(gateway.address, credentials) as channel:
            models = api_pb2_grpc.InferenceServiceStub(channel).ListModels(api_pb2.ListModelsRequest(), timeout=5)
            assert [m.id for m in models.data] == ["echo-tls"]
        with grpc.insecure_channel(gateway.address) as channel, pytest.raises(grpc.RpcError) as caught:
            api_pb2_grpc.InferenceServiceStub(channel).ListModels(api_pb2.ListModelsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # The worker's port is TLS too.
        with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError):
            harness.worker_pb2_grpc.WorkerServiceStub(channel).GetStats(harness.worker_pb2.GetStatsRequest(), timeout=5)
    finally:
        for proc in (bridge, worker, gateway):
            proc.stop()

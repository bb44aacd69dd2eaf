"""schemathesis against the bridge's own /openapi.json: valid and invalid
requests generated from it find no 5xx, and every error is OpenAI's envelope.

(schemathesis' pytest plugin does not run under pytest 9, so the operations'
Hypothesis strategies are driven directly.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.conftest import API_KEY, EchoSystem, start_echo_system, stop_system

MAX_EXAMPLES = 30  # per operation and mode: bounded to keep `make test` short


@pytest.fixture(scope="module")
def fuzz_system() -> Iterator[EchoSystem]:
    system = start_echo_system()
    yield system
    stop_system(system)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors_and_errors_are_enveloped(fuzz_system: EchoSystem, mode: schemathesis.GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_system.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    if mode == schemathesis.GenerationMode.NEGATIVE:
        # Only operations with a body or path parameters have invalid inputs to make.
        operations = [op for op in operations if op.method.upper() == "POST" or "{" in op.path]
    seen: dict[str, set[int]] = {}
    unsatisfiable: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_system.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.body!r} -> {response.text[:300]}"
            )
            if response.status_code >= 400 and case.path != "/ready":
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, response.text
                assert isinstance(error["message"], str) and error["message"]

        try:
            run()
        except Unsatisfiable:
            # No invalid value exists for some inputs (e.g. an unconstrained path string).
            unsatisfiable.append(f"{operation.method.upper()} {operation.path}")
    assert all(not name.startswith("POST") for name in unsatisfiable), unsatisfiable
    # The Responses API and vLLM's tokenize endpoints are in the document, so they are fuzzed too.
    assert {"POST /v1/responses", "POST /tokenize", "POST /detokenize"} <= set(seen), sorted(seen)
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert {"GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}"} <= set(seen), sorted(seen)
    # Positive data reached past validation somewhere (not only 4xx everywhere).
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert any(code < 300 for codes in seen.values() for code in codes), seen

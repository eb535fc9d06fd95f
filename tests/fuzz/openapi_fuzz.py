"""Schemathesis against a live server's OpenAPI schema: every operation, generated requests (valid
and invalid), zero 5xx answers. Bounded: ``examples`` per operation, no example database, a wall-clock
deadline for the whole run. Shared by the hub's and the model server's tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import hypothesis
from hypothesis import HealthCheck, given, settings

RUN_DEADLINE_S = 300.0


def fuzz_openapi(
    base_url: str,
    examples: int = 25,
    headers: dict[str, str] | None = None,
    skip: Callable[[str, str], bool] = lambda method, path: False,
) -> dict[str, int]:
    """Fuzz every operation of the schema at ``base_url/openapi.json``; raise on any 5xx answer
    (or a transport failure). Returns how many requests each operation got."""
    import schemathesis

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    started = time.monotonic()
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if not skip(operation.method.upper(), operation.path):
            counts[label] = _fuzz_operation(operation, label, base_url, examples, headers, started)
    return counts


def _fuzz_operation(operation, label: str, base_url: str, examples: int, headers: dict[str, str] | None, started: float) -> int:  # noqa: ANN001
    sent = [0]

    from schemathesis import GenerationMode

    # Valid requests and invalid ones (wrong types, missing fields, out-of-range values) alike.
    cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @given(case=cases)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def run(case) -> None:  # noqa: ANN001 (schemathesis.Case)
        assert time.monotonic() - started < RUN_DEADLINE_S, "the schema run took too long"
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        sent[0] += 1
        assert response.status_code < 500, (
            f"{label} answered {response.status_code} to {case.as_curl_command()}: {response.text[:500]}"
        )

    run()
    return sent[0]

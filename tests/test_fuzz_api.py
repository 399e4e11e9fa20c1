"""Schemathesis fuzzes labd's own OpenAPI against a real ``labd serve --demo``: no 5xx, ever.

Whatever a client sends (malformed bodies, wrong types, odd ids, absurd timeouts), the server
answers with a 4xx error record, never a 500 with a stack trace (DESIGN.md, Server). In
``make test`` the budget is small and the draws are derandomized (the CI profile); ``make
fuzz`` (LABD_HYPOTHESIS_PROFILE=fuzz, LABD_FUZZ_EXAMPLES) explores with random seeds, many more
examples per route, and a stateful phase that chains calls through the schema's links.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from labd.testing import LabdProcess

pytestmark = [pytest.mark.fuzz, pytest.mark.server]

FUZZING = os.environ.get("LABD_HYPOTHESIS_PROFILE") == "fuzz"
#: Examples per route: small and fixed in `make test`, large under `make fuzz`.
EXAMPLES = int(os.environ.get("LABD_FUZZ_EXAMPLES", "300" if FUZZING else "8"))


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    """A real ``labd serve --demo`` (no run store) on 127.0.0.1 and a free port."""
    with LabdProcess("serve", "--demo", "--port", "0", "--no-db", timeout=60) as proc:
        url = proc.wait_for("labd serving").split(" at ")[-1].strip().rstrip("/")
        yield url
        assert proc.stop(signal.SIGINT) == 0, "labd serve did not stop cleanly after fuzzing"


@pytest.fixture(scope="module")
def api_schema(demo_server: str) -> Any:
    return schemathesis.openapi.from_url(f"{demo_server}/openapi.json")


def _fuzz_operation(operation: Any, mode: GenerationMode) -> str | None:
    """Run one operation's examples; the failure text, or None when every answer was < 500."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def check(case: Any) -> None:
        case.call_and_validate(checks=[not_a_server_error], timeout=30)

    try:
        check()
    except Unsatisfiable:  # no schema-violating input exists (a route without parameters)
        return None
    except Exception as exc:  # schemathesis' failure groups; report them all, with the input
        return f"{operation.label} ({mode.value}): {exc}"
    return None


def test_no_route_answers_a_server_error(api_schema: Any) -> None:
    """Schema-valid and schema-violating requests to every route: never a 5xx."""
    # Schemathesis' own pytest integration does not run on pytest 9 yet, so the operations
    # are driven through its Python API: one Hypothesis test per operation and mode.
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 20, "the schema lost its routes"
    # SSE routes answer with a stream that only ends when the server stops; their bad-input
    # answers are tested in test_server_streams.py.
    operations = [op for op in operations if not op.path.startswith("/stream/")]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failure = _fuzz_operation(operation, mode)
            if failure is not None:
                failures.append(failure)
    assert not failures, "\n\n".join(failures)


@pytest.mark.skipif(not FUZZING, reason="the stateful phase runs under `make fuzz`")
def test_no_chain_of_calls_answers_a_server_error(api_schema: Any) -> None:
    """Chains of calls that feed one answer into the next request (the schema's links)."""

    class Chains(api_schema.as_state_machine()):  # type: ignore[misc]
        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=[not_a_server_error])

    Chains.run(settings=settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
        stateful_step_count=10,
    ))

"""The Hypothesis profile tests/conftest.py picks: derandomized under CI, random otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _profile_settings(**env: str) -> str:
    """Import conftest in a fresh interpreter with `env` and report the default settings."""
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "LABD_HYPOTHESIS_PROFILE")}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import conftest, hypothesis; "
        "s = hypothesis.settings.default; print(s.derandomize, s.database is None, s.max_examples)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(TESTS)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_ci_runs_property_tests_derandomized(ci: str) -> None:
    assert _profile_settings(CI=ci) == "True True 100"


def test_developer_runs_explore_random_inputs() -> None:
    assert _profile_settings().startswith("False False")


def test_fuzz_profile_explores_many_more_examples() -> None:
    derandomize, _, examples = _profile_settings(CI="true", LABD_HYPOTHESIS_PROFILE="fuzz").split()
    assert (derandomize, examples) == ("False", "5000")

"""The public surface of `labd` is exactly its sorted `__all__`.

Users write `import labd as ld` and never reach into submodules, so a class or function
that is importable from `labd` but missing from `__all__` (or listed but missing) is a bug.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import labd


def _defined_in_labd(value: object) -> bool:
    module = getattr(value, "__module__", None) or ""
    return module == "labd" or module.startswith("labd.")


def test_all_is_sorted_without_duplicates() -> None:
    assert labd.__all__ == sorted(set(labd.__all__)), (
        "labd.__all__ must be sorted and hold each name once; expected order: "
        f"{sorted(set(labd.__all__))}"
    )


def test_every_name_in_all_exists() -> None:
    missing = [name for name in labd.__all__ if not hasattr(labd, name)]
    assert not missing, f"labd.__all__ lists names that labd does not define: {missing}"


def test_every_public_class_and_function_is_in_all() -> None:
    exported = set(labd.__all__)
    unlisted = sorted(
        name
        for name, value in vars(labd).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and _defined_in_labd(value)
        and name not in exported
    )
    assert not unlisted, (
        f"labd exposes {unlisted} but labd.__all__ does not list them; "
        "add them to __all__ or import them under a private name"
    )


def test_importing_labd_does_not_load_the_testing_helpers() -> None:
    # A fresh interpreter: this test session may already have imported labd.testing.
    code = "import sys, labd; print('labd.testing' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"`import labd` failed in a fresh interpreter:\n{result.stderr}"
    assert result.stdout.strip() == "False", (
        "`import labd` imported labd.testing; runtime code must not depend on test helpers"
    )


def test_importing_labd_leaves_the_http_client_and_server_unloaded() -> None:
    # ld.ServerAPI and friends are lazy: a script that never talks HTTP never pays for httpx.
    heavy = ["labd.client", "labd.server", "labd.patterns", "httpx", "fastapi", "uvicorn"]
    code = f"import sys, labd; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"`import labd` failed in a fresh interpreter:\n{result.stderr}"
    assert result.stdout.strip() == "[]", f"`import labd` loaded {result.stdout.strip()}"


def test_lazy_top_level_names_are_the_client_and_patterns_objects() -> None:
    from labd import client, patterns

    assert labd.ServerAPI is client.ServerAPI
    assert labd.SSEClient is client.SSEClient
    assert labd.ensure_server is patterns.ensure_server
    assert labd.ensure_device is patterns.ensure_device


def test_an_unknown_top_level_name_is_an_attribute_error() -> None:
    try:
        labd.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("labd.NoSuchThing should raise AttributeError")

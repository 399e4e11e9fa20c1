"""A node's lab settings: the engine URL rules (no password off loopback is refused, TLS
accepted), the node name, the [lab] table and LABD_ENGINE, and the timings' checks."""

from __future__ import annotations

import pytest

from labd.lab import EngineUrlError, LabTimings, check_engine_url, lab_settings
from labd.lab.settings import describe_engine


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "redis://localhost:6379/0",
    "redis://[::1]:6379/0",
    "redis://labd-a:s3cret@lab-engine.example.org:6379/0",
    "rediss://labd-a:s3cret@10.0.0.5:6380/0",
    "rediss://127.0.0.1:6380/0",
    "memory://test",
])
def test_safe_engine_urls_are_accepted(url: str) -> None:
    assert check_engine_url(url) == url


@pytest.mark.parametrize("url", [
    "redis://10.1.2.3:6379/0",
    "redis://labd-a@lab-engine.example.org:6379/0",  # a user without a password
    "rediss://10.1.2.3:6380/0",  # TLS does not replace authentication
])
def test_a_network_engine_without_password_is_refused(url: str) -> None:
    with pytest.raises(EngineUrlError, match="not on this PC and the URL carries no password"):
        check_engine_url(url)


@pytest.mark.parametrize(("url", "problem"), [
    ("http://lab-engine:6379", "unsupported scheme 'http'"),
    ("redis://:6379/0", "names no host"),
    ("redis://host:notaport/0", "malformed"),
    ("", "must be a URL"),
])
def test_malformed_engine_urls_are_refused(url: str, problem: str) -> None:
    with pytest.raises(EngineUrlError, match=problem):
        check_engine_url(url)


def test_messages_never_show_the_password() -> None:
    url = "redis://labd-a:s3cret@10.0.0.5:6379/0"
    assert describe_engine(url) == "redis://labd-a@10.0.0.5:6379/0"
    with pytest.raises(EngineUrlError) as err:
        check_engine_url("http://labd-a:s3cret@10.0.0.5/")
    assert "s3cret" not in str(err.value)


def test_options_win_over_the_environment_and_the_config() -> None:
    table = {"engine": "redis://127.0.0.1:1/0", "node": "from-file", "claim_ttl": 9.0,
             "claim_renew": 3.0}
    env = {"LABD_ENGINE": "redis://127.0.0.1:2/0"}
    settings = lab_settings(None, None, table, env)
    assert settings is not None
    assert (settings.engine, settings.node) == ("redis://127.0.0.1:2/0", "from-file")
    assert settings.timings.claim_ttl == 9.0 and settings.timings.directory_ttl == 15.0
    chosen = lab_settings("redis://127.0.0.1:3/0", "pc1", table, env)
    assert chosen is not None and (chosen.engine, chosen.node) == ("redis://127.0.0.1:3/0", "pc1")
    assert lab_settings(None, None, {}, {}) is None  # no engine: one PC, as before


def test_the_defaults_are_the_issues() -> None:
    timings = LabTimings()
    assert (timings.directory_ttl, timings.heartbeat, timings.claim_ttl, timings.claim_renew) == (
        15.0, 5.0, 30.0, 5.0)


@pytest.mark.parametrize(("table", "problem"), [
    ({"engine": "redis://127.0.0.1/0", "colour": 1}, "unknown key 'colour'"),
    ({"engine": "redis://127.0.0.1/0", "heartbeat": 20.0}, "heartbeat .* must be shorter than directory_ttl"),
    ({"engine": "redis://127.0.0.1/0", "claim_renew": 30.0}, "claim_renew .* must be shorter than claim_ttl"),
    ({"engine": "redis://127.0.0.1/0", "claim_ttl": -1}, "claim_ttl must be a positive number"),
    ({"engine": "redis://127.0.0.1/0", "node": "a b"}, "node name must be"),
    ({"engine": "redis://127.0.0.1/0", "workers": 0}, "workers must be a positive whole number"),
    ({"node": "pc1"}, None),
])
def test_bad_lab_tables_are_one_line_errors(table: dict[str, object], problem: str | None) -> None:
    if problem is None:  # a node name alone is fine in the file: no engine, no lab
        assert lab_settings(None, None, table, {}) is None
        return
    with pytest.raises(EngineUrlError, match=problem):
        lab_settings(None, None, table, {})


def test_node_without_engine_is_refused() -> None:
    with pytest.raises(EngineUrlError, match="--node needs an engine"):
        lab_settings(None, "pc1", {}, {})

"""A node's lab settings: the engine URL (checked for safety), the node name, the timings.

Sources, first found wins: the command line (``--engine``, ``--node``), the environment
(``LABD_ENGINE``), the config file's ``[lab]`` table. The timings default to the issue's
figures and may be shortened (tests do) in ``[lab]``.

    settings = lab_settings(engine="redis://labd-a:pw@lab-engine:6379/0", node="a")
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from labd.lab.errors import EngineUrlError

__all__ = ["LAB_KEYS", "LabSettings", "LabTimings", "check_engine_url", "describe_engine",
           "lab_settings"]

_NODE = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")
_SCHEMES = ("redis", "rediss", "memory")


@dataclass(frozen=True)
class LabTimings:
    """How long things live in the engine and how often they are refreshed (seconds)."""

    directory_ttl: float = 15.0  # node and device keys expire unless refreshed
    heartbeat: float = 5.0  # refresh period of the directory
    claim_ttl: float = 30.0  # claims expire unless the home node renews them
    claim_renew: float = 5.0  # renew period of claims
    waiter_ttl: float = 15.0  # a queued claim's reservation expires unless refreshed
    claim_poll: float = 0.05  # how often a queued claim asks again

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise EngineUrlError(f"[lab] {name} must be a positive number of seconds, got {value!r}")
        if self.heartbeat >= self.directory_ttl:
            raise EngineUrlError(
                f"[lab] heartbeat ({self.heartbeat:g} s) must be shorter than directory_ttl "
                f"({self.directory_ttl:g} s), or live nodes would drop out of the directory")
        if self.claim_renew >= self.claim_ttl:
            raise EngineUrlError(
                f"[lab] claim_renew ({self.claim_renew:g} s) must be shorter than claim_ttl "
                f"({self.claim_ttl:g} s), or running claims would expire")


#: Keys of the config file's ``[lab]`` table.
LAB_KEYS = ("engine", "node", "workers", "stream_maxlen", *LabTimings.__dataclass_fields__)


@dataclass(frozen=True)
class LabSettings:
    """Everything a node needs to join a lab."""

    engine: str
    node: str
    timings: LabTimings = LabTimings()
    workers: int = 4  # threads answering requests for this node's devices
    stream_maxlen: int = 2000  # about 2 s of a 1 kHz stream in the engine


def describe_engine(url: str) -> str:
    """The URL without its password, for messages and /health."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port: say so without echoing the rest
        port = ":?"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_engine_url(url: str) -> str:
    """Return ``url`` if labd may use it as an engine, else raise :class:`EngineUrlError`.

    ``redis://`` or ``rediss://`` (TLS); an engine that is not on this PC's loopback needs a
    password (one ACL user per node: ``redis://labd-a:PASSWORD@lab-engine:6379/0``).
    ``memory://`` is the in-process coordinator (one process only).
    """
    if not isinstance(url, str) or not url:
        raise EngineUrlError(f"engine must be a URL such as redis://HOST:6379/0, got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise EngineUrlError(f"engine URL {describe_engine(url)!r} is malformed: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise EngineUrlError(
            f"engine URL {describe_engine(url)!r}: unsupported scheme {parts.scheme!r}; use "
            "redis:// (or rediss:// for TLS) to a Redis 7 or Valkey server")
    if parts.scheme == "memory":
        return url
    host = parts.hostname
    if not host:
        raise EngineUrlError(f"engine URL {url!r} names no host; e.g. redis://lab-engine:6379/0")
    if not parts.password and not _is_loopback(host):
        raise EngineUrlError(
            f"engine {describe_engine(url)!r} is not on this PC and the URL carries no password: "
            "labd refuses an engine anyone on the network could command. Give each node an ACL "
            "user with a password (redis://labd-NODE:PASSWORD@HOST:6379/0, see "
            "docs/multi-host.md), and prefer rediss:// (TLS) across the building network.")
    return url


def _node_name(value: object) -> str:
    if not isinstance(value, str) or not _NODE.match(value):
        raise EngineUrlError(
            f"node name must be 1 to 64 letters, digits or _ - . (e.g. the PC's name), got {value!r}")
    return value


def lab_settings(
    engine: str | None = None, node: str | None = None,
    table: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
) -> LabSettings | None:
    """The node's lab settings from the options, ``LABD_ENGINE`` and ``[lab]``; None: no lab.

    Raises :class:`EngineUrlError` (one line) for a bad URL, node name or timing.
    """
    env = os.environ if environ is None else environ
    table = dict(table or {})
    unknown = sorted(set(table) - set(LAB_KEYS))
    if unknown:
        raise EngineUrlError(f"[lab] has unknown key {unknown[0]!r}; valid keys: {', '.join(LAB_KEYS)}")
    url = engine or env.get("LABD_ENGINE") or table.get("engine")
    if not url:
        if node is not None:
            raise EngineUrlError("--node needs an engine: pass --engine redis://HOST:6379/0, set "
                                 "LABD_ENGINE, or give [lab] engine in the config")
        return None
    name = node or table.get("node") or socket.gethostname().split(".")[0]
    timings = LabTimings(**{k: table[k] for k in LabTimings.__dataclass_fields__ if k in table})
    workers = table.get("workers", 4)
    maxlen = table.get("stream_maxlen", 2000)
    for key, value in (("workers", workers), ("stream_maxlen", maxlen)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EngineUrlError(f"[lab] {key} must be a positive whole number, got {value!r}")
    return LabSettings(check_engine_url(str(url)), _node_name(name), timings, workers, maxlen)

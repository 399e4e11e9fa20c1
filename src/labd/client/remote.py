"""Remote devices that feel local: ``labd.connect(url).get_device("laser1").get_power()``.

:func:`connect` returns a :class:`RemoteDaemon`, whose methods mirror :class:`labd.LabDaemon`
where that makes sense over HTTP. ``get_device`` returns a :class:`RemoteDevice` proxy: its
methods are the device's public methods (listed by ``/devices/{id}/methods``), each call is a
``POST /devices/{id}/call``, and failures raise the same exception types as locally.

Example::

    with labd.connect("http://127.0.0.1:5000", owner="alice") as lab:
        laser = lab.get_device("laser1")
        laser.set_wavelength(1550.0)
        handle = lab.execute_task(None, "WavelengthSweep", laser_id="laser1",
                                  detector_id="pm1", start_wl=1549, stop_wl=1551, steps=21)
        print(handle.wait(timeout=60)["results"][0])
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from labd.client._http import acting_owner
from labd.client.api import DEFAULT_URL, ServerAPI
from labd.client.handles import RemoteTaskHandle
from labd.errors import InvalidArgumentError, LeaseError, UnknownNameError, describe_choices

__all__ = ["RemoteDaemon", "RemoteDevice", "RemoteLease", "RemoteMethod", "connect"]

_KINDS = {
    "positional_only": inspect.Parameter.POSITIONAL_ONLY,
    "positional_or_keyword": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "var_positional": inspect.Parameter.VAR_POSITIONAL,
    "keyword_only": inspect.Parameter.KEYWORD_ONLY,
    "var_keyword": inspect.Parameter.VAR_KEYWORD,
}


def _signature(spec: dict[str, Any]) -> inspect.Signature | None:
    """The method's signature for ``help()`` and IDEs, rebuilt from its description."""
    try:
        params = []
        for p in spec.get("parameters") or []:
            kind = _KINDS[p.get("kind", "positional_or_keyword")]
            default = inspect.Parameter.empty if p.get("required", True) else p.get("default")
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                default = inspect.Parameter.empty
            params.append(inspect.Parameter(p["name"], kind, default=default))
        return inspect.Signature(params)
    except (KeyError, TypeError, ValueError):  # an odd description must not break the proxy
        return None


class RemoteMethod:
    """One device method on the server; calling it is ``POST /devices/{id}/call``."""

    def __init__(self, api: ServerAPI, device_id: str, spec: dict[str, Any]) -> None:
        self._api = api
        self.device_id = device_id
        self.__name__ = self.__qualname__ = str(spec["name"])
        self.__doc__ = spec.get("doc")
        self.kind: str | None = spec.get("kind")  # "query" or "command"
        signature = _signature(spec)
        if signature is not None:
            self.__signature__ = signature

    def __repr__(self) -> str:
        return f"<remote {self.kind or 'method'} {self.device_id}.{self.__name__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._api.call(self.device_id, self.__name__, args, kwargs)


class RemoteDevice:
    """A device on a labd server, used like the local object: ``laser.set_wavelength(1550)``.

    Only methods travel over HTTP; reading or setting other attributes raises AttributeError.
    :meth:`RemoteDaemon.refresh_device` re-reads the method list after a server change.
    """

    _api: ServerAPI
    device_id: str
    _methods: dict[str, dict[str, Any]]

    def __init__(self, api: ServerAPI, device_id: str, methods: Sequence[dict[str, Any]]) -> None:
        object.__setattr__(self, "_api", api)
        object.__setattr__(self, "device_id", device_id)
        object.__setattr__(self, "_methods", {str(m["name"]): dict(m) for m in methods})

    def __getattr__(self, name: str) -> RemoteMethod:
        # Only reached when normal lookup fails; private names are never forwarded.
        if name.startswith("_"):
            raise AttributeError(name)
        spec = self._methods.get(name)
        if spec is None:
            raise AttributeError(
                f"Remote device {self.device_id!r} has no method {name!r}. Methods: "
                f"{describe_choices(self._methods)}. (Only methods are available remotely; "
                "attribute reads are not forwarded.)"
            )
        return RemoteMethod(self._api, self.device_id, spec)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"Cannot set {name!r} on remote device {self.device_id!r}: attributes do not travel "
            "over HTTP. Call a method instead (for example a set_... method)."
        )

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._methods))

    def __repr__(self) -> str:
        return f"<RemoteDevice {self.device_id!r} on {self._api.base_url}>"

    @property
    def method_names(self) -> list[str]:
        """Names of the device's public methods."""
        return sorted(self._methods)


class RemoteLease:
    """A lease held on the server; a context manager that releases on exit.

    Inside ``with lease:`` requests from this thread through the same connection carry the
    lease holder as ``X-Labd-Owner``, as a local lease makes the thread act as its holder.
    """

    def __init__(self, api: ServerAPI, lease: dict[str, Any]) -> None:
        self._api = api
        self._lease = dict(lease)
        self._released = False
        self._acting: contextlib.ExitStack | None = None

    def __repr__(self) -> str:
        return f"<RemoteLease {self.lease_id!r} of {self.owner!r} on {self.device_ids}>"

    @property
    def lease_id(self) -> str:
        """The server's id for this lease."""
        return str(self._lease["lease_id"])

    @property
    def owner(self) -> str:
        """Who holds it (the principal that may command its devices)."""
        return str(self._lease.get("owner") or "")

    @property
    def device_ids(self) -> list[str]:
        """The leased devices."""
        return list(self._lease.get("device_ids") or [])

    def to_dict(self) -> dict[str, Any]:
        """The lease as the server last described it."""
        return dict(self._lease)

    def is_active(self) -> bool:
        """Ask the server whether the lease is still active (not released, expired or broken)."""
        leases = self._api.list_leases().get("leases", [])
        return any(lease.get("lease_id") == self.lease_id for lease in leases)

    def renew(self, ttl: float | None = None) -> None:
        """Push the expiry ``ttl`` seconds (default: the original ttl) into the future."""
        answer = self._api.renew_lease(self.lease_id, ttl)
        if isinstance(answer, dict) and "lease_id" in answer:
            self._lease = dict(answer)

    def release(self) -> None:
        """Give the devices back. Idempotent; a lease that already ended is not an error."""
        if self._released:
            return
        try:
            self._api.release_lease(self.lease_id)
        except (LeaseError, UnknownNameError):
            pass  # expired or broken meanwhile: the devices are free either way
        self._released = True

    def __enter__(self) -> RemoteLease:
        if self._released:
            raise LeaseError(f"Lease {self.lease_id!r} was released; claim the devices again.")
        stack = contextlib.ExitStack()
        stack.enter_context(acting_owner(self._api, self.owner))
        self._acting = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._acting is not None:
            self._acting.close()
            self._acting = None
        self.release()


def _device_id(device: RemoteDevice | str) -> str:
    return device.device_id if isinstance(device, RemoteDevice) else device


class RemoteDaemon:
    """A labd server seen as a daemon: remote devices, task handles and leases.

    Create it with :func:`connect`. ``api`` is the underlying :class:`ServerAPI` for anything
    not wrapped here.
    """

    def __init__(self, api: ServerAPI) -> None:
        self.api = api

    def __repr__(self) -> str:
        return f"<RemoteDaemon {self.api.base_url}>"

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.api.base_url

    # ------------------------------------------------------------------ devices
    def get_device(self, device_id: RemoteDevice | str) -> RemoteDevice:
        """A proxy for the device; :class:`RemoteUnknownDeviceError` (a ValueError) if none."""
        device_id = _device_id(device_id)
        methods = self.api.get_device_methods(device_id)["methods"]
        return RemoteDevice(self.api, device_id, methods)

    refresh_device = get_device

    def add_device(
        self, device_id: str, device_type: str, *, connect: bool = False, **params: Any
    ) -> RemoteDevice:
        """Add a device of a registered type on the server (as ``LabDaemon.add_device``)."""
        self.api.add_device(device_id, device_type, params, connect=connect)
        return self.get_device(device_id)

    def connect_device(self, device: RemoteDevice | str, timeout: float | None = None) -> None:
        """Connect a device on the server."""
        self.api.connect_device(_device_id(device), timeout)

    def disconnect_device(self, device: RemoteDevice | str, timeout: float | None = None) -> None:
        """Disconnect a device on the server (idempotent). ``timeout`` is accepted for symmetry."""
        self.api.disconnect_device(_device_id(device))

    def device_info(self, device_id: str) -> dict[str, Any]:
        """State, owner, stream stats and last error of one device."""
        info: dict[str, Any] = self.api.get_device(device_id)
        return info

    def list_devices(self) -> list[dict[str, Any]]:
        """:meth:`device_info` for every device."""
        return list(self.api.list_devices()["devices"])

    def device_methods(self, device_id: str) -> list[dict[str, Any]]:
        """Public methods of a device: name, kind (query/command), parameters, doc."""
        return list(self.api.get_device_methods(device_id)["methods"])

    def call_device(
        self,
        device_id: str,
        method: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Call ``device.method(*args, **kwargs)`` by name and return its result."""
        return self.api.call(device_id, method, args, kwargs)

    # ------------------------------------------------------------------ tasks
    def execute_task(
        self,
        task_id: str | None,
        task_type: str,
        *,
        wait_for_devices: bool | float = False,
        **params: Any,
    ) -> RemoteTaskHandle:
        """Start a run on the server (as ``LabDaemon.execute_task``); returns its handle."""
        answer = self.api.execute_task(task_id, task_type, params, wait_for_devices)
        return RemoteTaskHandle(self.api, str(answer["task_id"]), task_type)

    def get_task(self, task_id: str) -> RemoteTaskHandle:
        """A handle on a live or retained run; :class:`RemoteUnknownTaskError` if none."""
        info = self.api.get_task(task_id)
        return RemoteTaskHandle(self.api, task_id, info.get("task_type"))

    def list_tasks(self) -> list[dict[str, Any]]:
        """Summaries of live and retained runs."""
        return list(self.api.list_tasks()["tasks"])

    # ------------------------------------------------------------------ history
    def runs(
        self,
        status: str | None = None,
        task_type: str | None = None,
        since: str | float | datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Run history, newest first (as ``LabDaemon.runs``); summaries without results.

        ``since`` is ISO 8601, POSIX seconds or a datetime. Page with ``offset``.
        """
        return list(self.api.list_runs(status, task_type, since, limit, offset)["runs"])

    def get_run(self, task_id: str) -> dict[str, Any]:
        """The full record of a run, from this or an earlier server session (arrays as lists)."""
        record: dict[str, Any] = self.api.get_run(task_id)
        return record

    @contextlib.contextmanager
    def task_context(
        self, task_id: str | None, task_type: str, **params: Any
    ) -> Iterator[RemoteTaskHandle]:
        """Start a run for the block; cancel it on exit if it is still running."""
        handle = self.execute_task(task_id, task_type, **params)
        try:
            yield handle
        finally:
            if handle.is_running():
                handle.cancel()

    # ------------------------------------------------------------------ leases
    def claim(
        self, device_ids: Sequence[str], owner: str | None = None, ttl: float | None = None
    ) -> RemoteLease:
        """Lease devices to ``owner`` (default: the connection's owner) for ``ttl`` seconds.

        Example::

            with lab.claim(["laser1"], owner="alice", ttl=30) as lease:
                laser.set_wavelength(1550.0)
                lease.renew()
        """
        holder = owner or self.api.owner
        if not holder:
            raise InvalidArgumentError(
                "claim: say who holds the lease: pass owner='alice' or connect(url, owner='alice')."
            )
        return RemoteLease(self.api, self.api.claim(device_ids, holder, ttl))

    def list_leases(self) -> list[dict[str, Any]]:
        """Active leases on the server."""
        return list(self.api.list_leases()["leases"])

    # ------------------------------------------------------------------ lifecycle
    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer."""
        answer: dict[str, Any] = self.api.health()
        return answer

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self.api.close()

    def __enter__(self) -> RemoteDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str = DEFAULT_URL,
    *,
    timeout: float = 30.0,
    owner: str | None = None,
    token: str | None = None,
    check: bool = True,
) -> RemoteDaemon:
    """Connect to a labd server; with ``check`` (default) fail now if it does not answer.

    Example: ``lab = labd.connect("http://127.0.0.1:5000", owner="alice")``.
    Raises :class:`ServerConnectionError` naming the URL if nothing answers.
    """
    api = ServerAPI(url, timeout=timeout, owner=owner, token=token)
    if check:
        try:
            api.health()
        except BaseException:
            api.close()
            raise
    return RemoteDaemon(api)

"""Follow a remote task run with a live progress bar until it ends (``labd run --follow``).

Progress arrives as Server-Sent Events from ``/stream/tasks/{id}`` (an :class:`SSEClient`
on its own thread, handing events over through a queue). The run is also polled about once
a second, so a lost stream or a missed ``finished`` event still ends the bar correctly.

Ctrl-C while following asks whether to cancel the run (cancels without asking when stdin
is not a terminal); answering no detaches and leaves the run going.
"""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

if TYPE_CHECKING:
    from labd.client import ServerAPI

__all__ = ["FINISHED_STATES", "FollowOutcome", "follow_task"]

FINISHED_STATES = frozenset({"completed", "failed", "cancelled", "interrupted"})
# Poll the run at least this often, whatever the stream does.
POLL_INTERVAL_S = 1.0
# After a cancel, how long to wait for the run to acknowledge it before detaching.
CANCEL_GRACE_S = 15.0


@dataclass
class FollowOutcome:
    """How following ended: the run's last known info and what the user did."""

    info: dict[str, Any]
    cancelled_by_user: bool = False
    detached: bool = False

    @property
    def status(self) -> str:
        """The run's status (``completed``, ``failed``, ...), ``unknown`` if never seen."""
        return str(self.info.get("status") or "unknown")


class _Follower:
    """Owns the progress bar, the event queue and the optional stream of one run."""

    def __init__(self, api: ServerAPI, base_url: str, task_id: str, console: Console) -> None:
        self.api = api
        self.base_url = base_url
        self.task_id = task_id
        self.console = console
        self.events: queue.Queue[Mapping[str, Any]] = queue.Queue()
        self.info: dict[str, Any] = {"task_id": task_id}
        self.last_poll = 0.0
        # True once a poll (not just a stream event) saw the run finished, result included.
        self.polled_final = False
        self.stream: Any = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[message]}"),
            console=console,
            transient=False,
        )
        self.bar: TaskID = self.progress.add_task(task_id, total=None, message="")

    # -- the stream --------------------------------------------------------------
    def start_stream(self) -> None:
        """Subscribe to the run's events; on any failure fall back to polling only."""
        try:
            from labd.client import SSEClient

            self.stream = SSEClient(self.base_url, self._on_event)
            self.stream.start_task_stream(self.task_id)
        except Exception:  # the poll still follows the run; a stream is only faster
            self.stream = None

    def _on_event(self, name: str, data: Any) -> None:
        # Runs on the SSE thread: only hand over, never touch the terminal from here.
        if isinstance(data, Mapping):
            self.events.put({**data, "event": name})

    def stop_stream(self) -> None:
        """Close the stream (bounded); safe to call twice."""
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.stop_stream(timeout=2.0)
            except Exception:  # closing is best effort; the run is unaffected
                pass

    # -- the loop ----------------------------------------------------------------
    def run_until_finished(self, deadline: float | None = None) -> bool:
        """Update the bar until the run finishes (True) or ``deadline`` passes (False)."""
        while True:
            if self.info.get("status") in FINISHED_STATES:
                if not self.polled_final:
                    self.poll()  # a stream event said so; the result and error come from the run
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            try:
                self._apply(self.events.get(timeout=0.2))
            except queue.Empty:
                pass
            if time.monotonic() - self.last_poll >= POLL_INTERVAL_S:
                self.poll()

    def poll(self) -> None:
        """Fetch the run's info and show it."""
        self.last_poll = time.monotonic()
        info = self.api.get_task(self.task_id)
        if isinstance(info, Mapping):
            self.info = dict(info)
            self.polled_final = self.info.get("status") in FINISHED_STATES
            self._show_progress(self.info.get("progress"))

    def _apply(self, event: Mapping[str, Any]) -> None:
        name = event.get("event")
        if name == "progress":
            self._show_progress(event.get("progress", event))
        elif name == "state":
            status = event.get("status") or event.get("state")
            if isinstance(status, str):
                self.info["status"] = status
            if "progress" in event:
                self._show_progress(event["progress"])
        elif name == "finished":
            status = event.get("status")
            self.info["status"] = status if isinstance(status, str) else "completed"

    def _show_progress(self, progress: object) -> None:
        if not isinstance(progress, Mapping):
            return
        done, total = progress.get("done"), progress.get("total")
        message = progress.get("message") or ""
        self.progress.update(
            self.bar,
            completed=float(done) if isinstance(done, int | float) else 0.0,
            total=float(total) if isinstance(total, int | float) and total > 0 else None,
            message=str(message),
        )


def follow_task(
    api: ServerAPI,
    base_url: str,
    task_id: str,
    console: Console,
    intro: Text | None = None,
    *,
    ask: bool = True,
) -> FollowOutcome:
    """Show a progress bar for ``task_id`` until it ends; handle Ctrl-C (cancel or detach).

    On Ctrl-C, ask whether to cancel (on a terminal, with ``ask``) or cancel at once.

    ``intro`` is printed first, inside the Ctrl-C handling, so a Ctrl-C right after the user
    saw it still offers to cancel.

    Example::

        outcome = follow_task(api, url, "sweep1", console)
        print(outcome.status, outcome.info.get("result"))
    """
    follower = _Follower(api, base_url, task_id, console)
    outcome = FollowOutcome(info=follower.info)
    try:
        try:
            if intro is not None:
                console.print(intro)
            follower.start_stream()
            with follower.progress:
                follower.poll()
                follower.run_until_finished()
        except KeyboardInterrupt:
            follower.progress.stop()
            outcome.cancelled_by_user, outcome.detached = _after_interrupt(follower, ask)
        outcome.info = follower.info
        return outcome
    finally:
        follower.stop_stream()


def _after_interrupt(follower: _Follower, ask: bool) -> tuple[bool, bool]:
    """Ctrl-C: cancel (asking first on a terminal) and wait a little, or detach."""
    task_id = follower.task_id
    if ask and sys.stdin.isatty():
        try:
            cancel = typer.confirm(f"Cancel task {task_id!r} on the server?", default=True)
        except (KeyboardInterrupt, typer.Abort, EOFError):
            cancel = False
    else:
        cancel = True
    if not cancel:
        follower.console.print(
            f"Detached; task {task_id!r} keeps running. See it with `labd tasks`, "
            f"stop it with `labd cancel {task_id}`."
        )
        return False, True
    try:
        follower.api.cancel_task(task_id)
    except Exception:
        # It may have finished just before the cancel arrived; then there is nothing to cancel.
        follower.poll()
        if follower.info.get("status") in FINISHED_STATES:
            return False, False
        raise
    follower.console.print(f"Cancellation of task {task_id!r} requested; waiting for it to stop...")
    try:
        finished = follower.run_until_finished(time.monotonic() + CANCEL_GRACE_S)
    except KeyboardInterrupt:
        finished = False
    if not finished:
        follower.console.print(f"Task {task_id!r} has not stopped yet; check it with `labd tasks`.")
    return True, not finished

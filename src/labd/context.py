"""LabDaemon 1.0's ``labdaemon.context`` under labd: :class:`TaskContext`.

Kept so that ``from labdaemon.context import TaskContext`` becomes ``from labd.context import
TaskContext``. The class lives in :mod:`labd.tasks`; new code can write ``ld.TaskContext``.
"""

from __future__ import annotations

from labd.tasks import TaskContext

__all__ = ["TaskContext"]

"""LabDaemon 1.0's ``labdaemon.handlers`` under labd: :class:`TaskHandle`.

Kept so that ``from labdaemon.handlers import TaskHandle`` becomes ``from labd.handlers import
TaskHandle``. The class lives in :mod:`labd.tasks`; new code can write ``ld.TaskHandle``.
"""

from __future__ import annotations

from labd.tasks import TaskHandle

__all__ = ["TaskHandle"]

"""Build hook: a wheel (or sdist build) first builds the dashboard's browser assets.

Everything else is declared in pyproject.toml. ``build_py`` runs ``tools/build_assets.py``
(``npm ci`` when the lockfile changed, then the dist files copied into
``src/labd/web/static/vendor/``) so the wheel ships them; built files are never committed.
An editable install (``make install``) skips it: ``make demo`` and ``make test`` build the
assets themselves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithAssets(build_py):
    """``build_py`` that builds the dashboard's assets first (not for editable installs)."""

    def run(self) -> None:
        if not getattr(self, "editable_mode", False):
            subprocess.run([sys.executable, str(ROOT / "tools" / "build_assets.py")], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithAssets})

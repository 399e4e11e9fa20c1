"""Build the dashboard's browser assets: ``npm ci`` when the lockfile changed, then copy dist files.

The JavaScript packages (htmx.org, htmx-ext-sse, uplot, swagger-ui-dist) are pinned in
``package.json`` with ``package-lock.json``; their dist files are copied into
``src/labd/web/static/vendor/`` (ignored by git: built files are never committed). Run by
``make demo``, ``make test`` and the wheel build (``setup.py``'s ``build_py``).

``npm ci`` runs with ``--ignore-scripts`` (no install scripts, so no telemetry package phones
home) and only when ``package-lock.json`` is newer than ``node_modules/.labd-npm-ci``; the copy
runs when a copied file is missing or older than its source.

Usage: python tools/build_assets.py [--check]   (--check: exit 1 if the assets are not built)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "node_modules"
VENDOR = ROOT / "src" / "labd" / "web" / "static" / "vendor"
NPM_STAMP = MODULES / ".labd-npm-ci"

#: (source under node_modules, file name under vendor/)
FILES: tuple[tuple[str, str], ...] = (
    ("htmx.org/dist/htmx.min.js", "htmx.min.js"),
    ("htmx.org/LICENSE", "htmx.LICENSE.txt"),
    ("htmx-ext-sse/dist/sse.min.js", "htmx-ext-sse.min.js"),
    ("htmx-ext-sse/LICENSE", "htmx-ext-sse.LICENSE.txt"),
    ("uplot/dist/uPlot.iife.min.js", "uPlot.iife.min.js"),
    ("uplot/dist/uPlot.min.css", "uPlot.min.css"),
    ("uplot/LICENSE", "uPlot.LICENSE.txt"),
    ("swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui-bundle.js"),
    ("swagger-ui-dist/swagger-ui.css", "swagger-ui.css"),
    ("swagger-ui-dist/favicon-32x32.png", "swagger-favicon-32x32.png"),
    ("swagger-ui-dist/LICENSE", "swagger-ui.LICENSE.txt"),
)


def _stale(target: Path, *sources: Path) -> bool:
    if not target.exists():
        return True
    built = target.stat().st_mtime
    return any(source.stat().st_mtime > built for source in sources if source.exists())


def npm_ci() -> None:
    """``npm ci`` if ``package-lock.json`` changed since the last one (or never ran)."""
    lock = ROOT / "package-lock.json"
    if not _stale(NPM_STAMP, lock, ROOT / "package.json"):
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("build_assets: npm is not installed; the dashboard's assets come from npm "
                 "(Debian: apt-get install nodejs npm; .ci/run does this).")
    print("build_assets: npm ci (package-lock.json changed)", flush=True)
    subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=ROOT,
                   check=True)
    NPM_STAMP.touch()


def copy_dist() -> int:
    """Copy each dist file that is missing or older than its source; returns how many."""
    VENDOR.mkdir(parents=True, exist_ok=True)
    copied = 0
    for source_name, target_name in FILES:
        source, target = MODULES / source_name, VENDOR / target_name
        if not source.is_file():
            sys.exit(f"build_assets: {source} is missing after npm ci; is package.json intact?")
        if _stale(target, source):
            shutil.copyfile(source, target)
            copied += 1
    return copied


def built() -> bool:
    """True if every vendor file exists."""
    return all((VENDOR / name).is_file() for _, name in FILES)


def main(argv: list[str]) -> int:
    if "--check" in argv:
        return 0 if built() else 1
    npm_ci()
    copied = copy_dist()
    print(f"build_assets: {copied} file(s) copied to {VENDOR.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m labd.cli ...``: the ``labd`` command without the console script (tests, venvs)."""

from labd.cli import main

main()

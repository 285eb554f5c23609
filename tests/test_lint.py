"""The code's own checks: ``make lint`` (ruff over the sources and tests, mypy --strict over the package as it is
imported) passes. Types are part of the house style; without this they rot unnoticed, as they did once."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_make_lint_passes() -> None:
    p = subprocess.run(["make", "-s", "lint"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]

"""The fuzz run in its CI size: a few thousand inputs against a live daemon, every invariant of :mod:`fuzz.run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e.harness import require_tools
from fuzz.run import fuzz

pytestmark = pytest.mark.e2e


def test_fuzz_ci(tmp_path: Path) -> None:
    require_tools("qemu-io")
    report = fuzz(2000, workdir=tmp_path, workers=32, seed_value=7, max_seconds=40)
    summary = report.summary()
    assert report.tally.done >= 1000, f"too few inputs ran: {summary}"
    assert report.ok, json.dumps(summary, indent=2) + "\n" + "\n".join(report.tally.samples[:10]) + \
        "\n" + "\n".join(report.verify_errors[:5])

"""The soak run in its CI size: 30 s of 64 sessions at QD32 with a snapshot and a resync half-way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e.harness import require_tools
from soak.run import soak

pytestmark = pytest.mark.e2e


def test_soak_ci(tmp_path: Path) -> None:
    require_tools("qemu-io")
    r = soak(30, workdir=tmp_path)
    assert r["ok"], json.dumps(r, indent=2)
    assert r["io_errors"] == 0 and r["ops"] > 10000

"""The quick form of the crash trials that CI runs: three kill -9 trials from :mod:`crash.run` (``make crash-trials
N=50`` runs many). Each must lose no acknowledged durable write and alter no snapshot."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from crash.run import trial

pytestmark = pytest.mark.e2e

CI_TRIALS = 3


@pytest.mark.parametrize("n", range(CI_TRIALS))
def test_kill_9_during_writes_and_snapshots_loses_nothing(tmp_path: Path, n: int) -> None:
    seed = random.SystemRandom().randrange(1 << 30)
    r = trial(tmp_path / f"trial-{n}", n, seed)
    summary = f"seed {seed} (rerun: python tests/crash/run.py 1 --seed {seed}): {r.problems[:10]}"
    assert r.writes_acked > 20 and r.writes_durable_checked > 0, summary  # the trial really ran
    assert r.lost_acked_writes == 0, summary
    assert r.altered_snapshots == 0 and r.lost_snapshots == 0, summary
    assert r.damaged_blocks == 0 and r.integrity_errors == 0, summary
    assert not r.problems, summary

"""The short form of the power-loss harness that CI runs (``make powerloss N=50`` runs the long one): one recording
on the FUSE recorder, a few cuts spread over writes, snapshot sets, a clone fill and a resync, and both negative
controls, which must be caught."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from fusefs import fuse_available
from powerloss.run import PHASES, trials

pytestmark = pytest.mark.e2e

CI_CUTS = 8


def test_power_cuts_lose_no_durable_write_and_alter_no_snapshot(tmp_path: Path) -> None:
    why = fuse_available()
    if why:
        pytest.skip(why)
    seed = random.SystemRandom().randrange(1 << 30)
    s = trials(tmp_path, CI_CUTS, seed)
    rerun = f"seed {seed} (rerun: python tests/powerloss/run.py {CI_CUTS} --seed {seed})"
    assert {r.phase for r in s.results} == set(PHASES), rerun  # every phase was cut
    assert sum(r.res.writes_durable_checked for r in s.results) > 1000, rerun  # the checks really read durable blocks
    assert sum(r.res.snapshots_checked for r in s.results) >= 6, rerun
    for r in s.results:
        assert r.ok, f"{rerun}: cut at op {r.at} ({r.phase}, {r.mode}): {r.res.problems[:10]}"
    assert s.controls == {"lun": True, "pool": True}, f"{rerun}: a negative control went unnoticed: {s.controls}"
    assert s.staged_writes > 0, f"{rerun}: no first write took the staged path: the cuts did not cover it"

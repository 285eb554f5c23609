"""The quick form of the crash trials that CI runs: three kill -9 trials from :mod:`crash.run` during writes and
snapshots, one of a worker process (``serve --workers 2``) during the same, one during a clone's fill and one during a
resync (``make crash-trials N=50`` runs many). Each must lose
no acknowledged durable write and alter no snapshot; the clone must hold exactly its snapshot's content, and the
resync must finish with the LUN and its snapshot both reading the snapshot's content."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from crash.run import trial
from e2e.harness import require_tools

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


def test_kill_9_of_the_worker_serving_the_luns_during_writes_and_snapshots_loses_nothing(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(1 << 30)
    r = trial(tmp_path / "worker", 0, seed, "worker")
    summary = f"seed {seed} (rerun: python tests/crash/run.py 1 --kinds worker --seed {seed}): {r.problems[:10]}"
    assert r.writes_acked > 20 and r.writes_durable_checked > 0, summary
    assert r.lost_acked_writes == 0, summary
    assert r.altered_snapshots == 0 and r.lost_snapshots == 0, summary
    assert r.damaged_blocks == 0 and r.integrity_errors == 0, summary
    assert not r.problems, summary


@pytest.mark.parametrize("kind", ["clone", "resync"])
def test_kill_9_during_a_clone_fill_or_a_resync_then_restart_finishes_it_right(tmp_path: Path, kind: str) -> None:
    require_tools("qemu-io")
    seed = random.SystemRandom().randrange(1 << 30)
    r = trial(tmp_path / kind, 0, seed, kind)
    summary = f"seed {seed} (rerun: python tests/crash/run.py 1 --kinds {kind} --seed {seed}): {r.problems[:10]}"
    assert r.trial_errors == 0 and r.integrity_errors == 0, summary
    if kind == "clone":
        assert r.clones_checked == 1 and r.altered_clones == 0, summary
    else:
        assert r.resyncs_checked == 1 and r.wrong_resyncs == 0, summary
    assert not r.problems, summary

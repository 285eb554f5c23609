"""The live array as the restore engine sees it: the foreground baseline the adaptive throttle compares against."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lunsync.provider.resync_array import ArrayEngine
from lunsync.target.stats import CommandStats, Op


def test_a_stalled_command_cannot_inflate_the_throttles_baseline() -> None:
    stats = CommandStats()
    s = stats.lun("dest")
    for _ in range(2000):
        s.observe(int(Op.READ), 0.0002)
    s.observe(int(Op.WRITE), 20.0)  # one write waited out a stuck disk
    array: Any = SimpleNamespace(data_dir="/nonexistent", server=SimpleNamespace(stats=stats))
    baseline = ArrayEngine(array).baseline_latency_s("dest")
    # the mean would be ~10 ms, fifty times what the LUN's commands take, and the throttle would never back off
    assert baseline is not None and baseline < 0.00025, baseline

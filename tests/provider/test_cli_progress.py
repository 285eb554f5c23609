"""The CLI's progress display: the daemon's numbers in plain lines when not on a terminal (at most one line per
interval), nothing under --json, and a bar on a terminal."""

from __future__ import annotations

import io

from lunsync.provider.cli_progress import PLAIN_EVERY_S, ProgressDisplay, Step, line

MIB = 1 << 20


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_line_says_state_percent_sizes_rate_and_eta() -> None:
    assert line("recovery ab12", Step(27 * MIB, 64 * MIB, 4 * MIB, 9.4, "resyncing")) == (
        "recovery ab12: resyncing 42.2% (27MiB of 64MiB), 4MiB/s, ETA 0:09")
    assert line("clone a@b", Step(0, 1 << 30, None, None, "filling")) == (
        "clone a@b: filling 0.0% (0B of 1GiB), -, ETA -")
    assert line("x", Step(1, 2, 1.0, 3725.0, "resyncing")).endswith("ETA 1:02:05")


def test_plain_lines_off_a_terminal_at_most_one_per_interval() -> None:
    out, now = io.StringIO(), [0.0]
    with ProgressDisplay("r", stream=out, clock=lambda: now[0]) as shown:
        for i in range(10):
            now[0] = i * PLAIN_EVERY_S / 4
            shown.update(Step(i, 10, 1.0, 10.0 - i, "resyncing"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("r: resyncing 0.0%") and "\x1b" not in out.getvalue()


def test_nothing_when_disabled_and_a_bar_on_a_terminal() -> None:
    quiet = io.StringIO()
    with ProgressDisplay("r", stream=quiet, enabled=False) as shown:
        shown.update(Step(1, 2, 1.0, 1.0, "resyncing"))
    assert quiet.getvalue() == ""
    tty = _Tty()
    with ProgressDisplay("r", stream=tty) as shown:
        shown.update(Step(32 * MIB, 64 * MIB, 8 * MIB, 4.0, "resyncing"))
    text = tty.getvalue()
    assert "50.0%" in text and "8MiB/s" in text and "ETA 0:04" in text

"""How the CLI shows a long copy it waits for (``resync --wait``, ``recovery wait``, ``snapshot create --kind clone
--wait``): a progress bar with the daemon's rate and ETA on a terminal, plain lines otherwise.

This module owns that display and nothing else: the numbers are the daemon's (bytes done over wall-clock time, see
:mod:`lunsync.snapshots.progress`), never estimated again here, so the bar says what ``recovery show``, the API and
the metrics say. The display goes to stderr, which keeps stdout for the result (and for ``--json``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TextIO

PLAIN_EVERY_S = 2.0  # how often a plain line is printed when stderr is not a terminal


@dataclass(frozen=True, slots=True)
class Step:
    """One reading of a copy's progress, as the daemon reported it."""

    done: int
    total: int
    rate_bps: float | None
    eta_s: float | None
    state: str


def _size(n: float) -> str:
    from lunsync.provider.cli import human_size

    return str(human_size(int(n)))


def _eta(eta_s: float | None) -> str:
    if eta_s is None:
        return "ETA -"
    s = round(eta_s)
    return f"ETA {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"ETA {s // 60}:{s % 60:02d}"


def line(label: str, step: Step) -> str:
    """The plain form: ``recovery 1a2b: resyncing 42.0% (27MiB of 64MiB), 4MiB/s, ETA 0:09``."""
    pct = 100.0 if step.total <= 0 else 100.0 * step.done / step.total
    rate = "-" if step.rate_bps is None else f"{_size(step.rate_bps)}/s"
    return (f"{label}: {step.state} {pct:.1f}% ({_size(step.done)} of {_size(step.total)}), {rate}, "
            f"{_eta(step.eta_s)}")


class ProgressDisplay:
    """Use as a context manager and call :meth:`update` with each reading."""

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool = True,
                 clock: Any = time.monotonic) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._clock = clock
        self._bar: Any = None
        self._task: Any = None
        self._last_line = float("-inf")

    def __enter__(self) -> Self:
        if self.enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[sizes]}"),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"),
                                 console=Console(file=self.stream), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=1, sizes="", rate="", eta="")
        return self

    def update(self, step: Step) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            rate = "-" if step.rate_bps is None else f"{_size(step.rate_bps)}/s"
            self._bar.update(self._task, total=max(1, step.total), completed=step.done,
                             sizes=f"{_size(step.done)}/{_size(step.total)}", rate=rate, eta=_eta(step.eta_s))
            return
        now = self._clock()
        if now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            print(line(self.label, step), file=self.stream, flush=True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

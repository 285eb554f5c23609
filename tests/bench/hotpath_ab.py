"""Interleaved A/B runs of :mod:`tests.bench.hotpath` under several Python interpreters, with medians.

Each interpreter is one build to compare (a venv with the compiled wheel, an editable venv running the sources, a venv
with an older wheel); the runs alternate A B A B so the shared machine's load falls on all of them alike. Prints,
per interpreter, the median CPU microseconds per 4 KiB WRITE(10) and READ(10) command and every run's figure, leaving
out a run in which a stalled write sent the LUN's writes to its I/O threads.
It also prints the median of hotpath.py's floor, the bare 4 KiB ``pwritev``/``preadv`` on the same file, over every run.
Run: ``python tests/bench/hotpath_ab.py [--rounds R] [--commands N] [--fill-kib K] PYTHON [PYTHON ...]``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

HOTPATH = Path(__file__).resolve().parent / "hotpath.py"
_FIGURE = {op: re.compile(rf"{op}\(10\) 4 KiB\s+([\d.]+) us CPU") for op in ("WRITE", "READ")}
_FLOOR = {op: re.compile(rf"bare 4 KiB os\.p{op.lower()}v\s+([\d.]+) us CPU") for op in ("WRITE", "READ")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("pythons", nargs="+", help="interpreters to compare, one per build")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--commands", type=int, default=30000)
    ap.add_argument("--fill-kib", type=int, default=128, help="passed to hotpath.py (the LUN's fill piece size)")
    a = ap.parse_args()
    runs: dict[str, dict[str, list[float]]] = {p: {op: [] for op in _FIGURE} for p in a.pythons}
    floors: dict[str, list[float]] = {op: [] for op in _FLOOR}  # the same syscalls whichever build runs them
    builds: dict[str, str] = {}
    dropped = dict.fromkeys(a.pythons, 0)
    for _ in range(a.rounds):
        for py in a.pythons:
            p = subprocess.run([py, str(HOTPATH), str(a.commands), "--fill-kib", str(a.fill_kib)],
                               capture_output=True, text=True, check=False)
            if p.returncode:
                raise SystemExit(f"hotpath_ab: {py} {HOTPATH} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
            out = p.stdout
            builds[py] = out.splitlines()[0].removeprefix("hotpath: ")
            for op, pattern in _FIGURE.items():
                found = pattern.search(out)
                if found is None:
                    raise SystemExit(f"hotpath_ab: no {op} figure from {py}:\n{out}")
                if "not comparable" in out[found.start():].split("\n", 1)[0]:
                    dropped[py] += 1  # a stalled write sent the rest to the I/O threads (see hotpath.py)
                    continue
                runs[py][op].append(float(found.group(1)))
            for op, pattern in _FLOOR.items():
                if (found := pattern.search(out)) is not None:
                    floors[op].append(float(found.group(1)))
    for py in a.pythons:
        figures = "  ".join(f"{op} {statistics.median(v) if v else float('nan'):6.2f} us "
                            f"({' '.join(f'{x:.2f}' for x in v)})" for op, v in runs[py].items())
        print(f"{py} [{builds[py]}]: {figures}" + (f"  [{dropped[py]} runs dropped]" if dropped[py] else ""))
    print("floor (bare 4 KiB syscall, every run): " + "  ".join(
        f"{op} {statistics.median(v):6.2f} us" for op, v in floors.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())

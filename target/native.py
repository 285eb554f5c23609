"""Which build of the data path is running: the mypyc-compiled modules, or the pure-Python sources.

setup.py compiles the hot path into native modules unless LUNSYNC_PURE=1 (an editable install is always pure).
Benchmarks and the daemon's start-up line report it, since the two differ severalfold in CPU per command.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

# The modules setup.py compiles; one of them answers for all (they are built together or not at all).
_PROBE = "lunsync.target.connection"


def compiled() -> bool:
    """True when the data path runs as native (mypyc) modules."""
    spec = importlib.util.find_spec(_PROBE)
    origin = spec.origin if spec is not None else None
    return origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def describe() -> str:
    return "compiled (mypyc)" if compiled() else "pure Python"

"""Unit tests for lunsync.target.native: it names the build that is really imported."""

from __future__ import annotations

import importlib.machinery

from lunsync.target import connection, native, pdu


def test_reports_the_build_that_is_imported() -> None:
    native_suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert connection.__file__ is not None
    assert native.compiled() is connection.__file__.endswith(native_suffixes)
    assert native.describe() == ("compiled (mypyc)" if native.compiled() else "pure Python")
    # Built together or not at all: the codec is in the same state as the connection.
    assert pdu.__file__ is not None and pdu.__file__.endswith(native_suffixes) is native.compiled()

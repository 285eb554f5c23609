"""Tests for lunsync.snapshots.fsutil: the one atomic commit, copy, zeroing ladder and OSError mapping, on real files.

Where a kernel path cannot be forced on this machine (copy_file_range refused, fallocate unsupported) the syscall is
replaced by one that fails the way the kernel does, and the result on disk is checked."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from lunsync.snapshots import fsutil
from lunsync.snapshots.errors import MediumError, NotReady, OutOfSpace, ReadOnly, StorageError

MiB = 1 << 20


def _failing(code: int) -> Callable[..., None]:
    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


def _fd(path: Path, data: bytes = b"") -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDWR)


# --- atomic_write ------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_with_mode_0600_and_no_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    fsutil.atomic_write(path, "new contents")
    assert path.read_text() == "new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(a: str, b: str) -> None:
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fsutil.atomic_write(tmp_path / "x", b"data")
    assert events == ["file", "rename", "dir"]


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"old")

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        fsutil.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x"]


def test_exclusive_atomic_write_keeps_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    fsutil.atomic_write(path, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        fsutil.atomic_write(path, "second", exclusive=True)
    assert path.read_text() == "first"
    assert os.listdir(tmp_path) == ["token"]


def test_remove_file_also_removes_interrupted_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "bitmap"
    path.write_bytes(b"x")
    (tmp_path / ".bitmap.abc123.tmp").write_bytes(b"torn")
    (tmp_path / ".other.abc123.tmp").write_bytes(b"not ours")
    fsutil.remove_file(path)
    fsutil.remove_file(path)  # a missing file is not an error
    assert os.listdir(tmp_path) == [".other.abc123.tmp"]


# --- copy_range --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", [True, False])
def test_copy_range_copies_and_zero_fills_past_the_source_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offload: bool
) -> None:
    src = _fd(tmp_path / "src", bytes(range(256)) * 64)  # 16 KiB
    dst = _fd(tmp_path / "dst", b"\xee" * (64 << 10))  # older data where the copy lands
    if not offload:
        def refused(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refused)
    try:
        fsutil.copy_range(src, dst, 32 << 10, 4096, 8192)  # 12 KiB of data, then 20 KiB past the source's end
    finally:
        os.close(src)
        os.close(dst)
    out = (tmp_path / "dst").read_bytes()
    assert out[:8192] == b"\xee" * 8192
    assert out[8192:8192 + 12288] == (bytes(range(256)) * 64)[4096:]
    assert out[8192 + 12288:8192 + (32 << 10)] == bytes(20 << 10)
    assert out[8192 + (32 << 10):] == b"\xee" * ((64 << 10) - 8192 - (32 << 10))


def test_copy_range_raises_real_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(*args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", eio)
    src, dst = _fd(tmp_path / "a", bytes(4096)), _fd(tmp_path / "b")
    try:
        with pytest.raises(OSError) as e:
            fsutil.copy_range(src, dst, 4096, 0, 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(src)
        os.close(dst)


# --- zeroing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deallocate, modes", [(True, [0x03, 0x11]), (False, [0x11])])
def test_zero_range_falls_back_to_written_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deallocate: bool, modes: list[int]
) -> None:
    tried: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        tried.append(mode)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    fd = _fd(tmp_path / "f", b"\xaa" * (3 * MiB))
    monkeypatch.setattr(fsutil, "fallocate", unsupported)
    try:
        fsutil.zero_range(fd, 4096, 2 * MiB, deallocate=deallocate)
    finally:
        os.close(fd)
    data = (tmp_path / "f").read_bytes()
    assert data[:4096] == b"\xaa" * 4096 and data[4096:4096 + 2 * MiB] == bytes(2 * MiB)
    assert data[4096 + 2 * MiB:] == b"\xaa" * (MiB - 4096)
    assert tried == modes  # PUNCH_HOLE|KEEP_SIZE only when deallocating, then ZERO_RANGE|KEEP_SIZE, then zeros


def test_zero_range_punches_a_hole_on_a_real_file(tmp_path: Path) -> None:
    fd = _fd(tmp_path / "f", b"\xaa" * MiB)
    try:
        fsutil.zero_range(fd, 0, MiB)
        assert fsutil.is_hole(fd, 0, MiB)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(MiB)


def test_punch_says_when_it_could_not_and_raises_real_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = _fd(tmp_path / "f", b"\xaa" * 8192)
    try:
        monkeypatch.setattr(fsutil, "fallocate", _failing(errno.ENOTSUP))
        assert fsutil.punch(fd, 0, 4096) is False
        assert (tmp_path / "f").read_bytes() == b"\xaa" * 8192
        monkeypatch.setattr(fsutil, "fallocate", _failing(errno.EIO))
        with pytest.raises(OSError):
            fsutil.punch(fd, 0, 4096)
    finally:
        os.close(fd)


# --- the OSError mapping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, write, kind", [
    (errno.ENOSPC, True, OutOfSpace),
    (errno.EDQUOT, True, OutOfSpace),
    (errno.EROFS, True, ReadOnly),
    (errno.EPERM, True, ReadOnly),
    (errno.EPERM, False, MediumError),
    (errno.EBADF, False, NotReady),
    (errno.ENXIO, True, NotReady),
    (errno.ESTALE, False, NotReady),
    (errno.EIO, True, MediumError),
    (errno.EIO, False, MediumError),
])
def test_storage_error_maps_each_errno_once(code: int, write: bool, kind: type[StorageError]) -> None:
    err = fsutil.storage_error(OSError(code, os.strerror(code)), "write x at block 7", 7, write=write)
    assert type(err) is kind
    assert str(err).startswith("write x at block 7: ")
    if isinstance(err, MediumError):
        assert err.lba == 7 and err.write is write


def test_open_error_says_the_store_is_gone() -> None:
    assert isinstance(fsutil.open_error(OSError(errno.ENOENT, "No such file"), "/x"), NotReady)
    assert type(fsutil.open_error(OSError(errno.EACCES, "Permission denied"), "/x")) is StorageError

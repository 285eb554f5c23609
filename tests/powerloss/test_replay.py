"""The power-loss model on hand-made logs: what a cut keeps of data, names, renames, reused inodes and unsynced
writes, and what the negative control drops."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fusefs import LogOp
from powerloss.replay import replay

ROOT = 100


def op(kind: str, ino: int = 0, arg: int = 0, payload: bytes = b"") -> LogOp:
    return LogOp(kind, 0.0, ino, arg, payload)


def files(tmp_path: Path, ops: list[LogOp], cut: int | None = None, **kw: object) -> dict[str, bytes]:
    dest = Path(tempfile.mkdtemp(dir=tmp_path))
    replay(ops, ROOT, len(ops) if cut is None else cut, **kw).write_to(dest)  # type: ignore[arg-type]
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


def test_only_synced_data_and_names_survive(tmp_path: Path) -> None:
    ops = [op("create", 1, payload=b"100/a"), op("write", 1, 0, b"old"), op("fdatasync", 1),
           op("write", 1, 0, b"new"), op("create", 2, payload=b"100/b"), op("write", 2, 0, b"never synced")]
    assert files(tmp_path, ops) == {"a": b"old"}  # b's name was never committed: no sync after its create


def test_a_sync_of_one_file_commits_every_earlier_name_but_not_other_files_data(tmp_path: Path) -> None:
    ops = [op("create", 1, payload=b"100/a"), op("write", 1, 0, b"aaa"), op("create", 2, payload=b"100/b"),
           op("write", 2, 0, b"bbb"), op("fsync", 2)]
    assert files(tmp_path, ops) == {"a": b"", "b": b"bbb"}


def test_cut_before_the_sync_loses_it(tmp_path: Path) -> None:
    ops = [op("create", 1, payload=b"100/a"), op("write", 1, 0, b"x"), op("fsync", 1)]
    assert files(tmp_path, ops, cut=2) == {}
    assert files(tmp_path, ops, cut=3) == {"a": b"x"}


def test_rename_directories_and_a_reused_inode(tmp_path: Path) -> None:
    ops = [op("mkdir", 5, payload=b"100/d"), op("create", 1, payload=b"5/tmp"), op("write", 1, 0, b"v1"),
           op("fsync", 1), op("rename", 1, payload=b"5/tmp\x005/final"), op("unlink", 1, payload=b"5/final"),
           op("create", 1, payload=b"100/again"), op("write", 1, 0, b"v2"), op("truncate", 1, 1), op("fsync", 1)]
    assert files(tmp_path, ops) == {"again": b"v"}
    assert files(tmp_path, ops, cut=6) == {"d/tmp": b"v1"}  # the rename and unlink were never synced


def test_reorder_keeps_synced_data_and_some_unsynced_writes(tmp_path: Path) -> None:
    ops = [op("create", 1, payload=b"100/a"), op("write", 1, 0, b"s"), op("fsync", 1),
           *[op("write", 1, i, b"u") for i in range(1, 41)]]
    seen = set()
    for seed in range(5):
        got = files(tmp_path, ops, mode="reorder", seed=seed)["a"]
        assert got[:1] == b"s"
        seen.add(got.count(b"u"))
    assert max(seen) > 0 and min(seen) < 40  # some unsynced writes land, never all in every image


def test_the_negative_control_drops_synced_writes(tmp_path: Path) -> None:
    ops = [op("create", 1, payload=b"100/a"), op("write", 1, 0, b"keep"), op("write", 1, 0, b"lost"),
           op("fsync", 1)]
    assert files(tmp_path, ops, lose=lambda j, o: o.payload == b"lost") == {"a": b"keep"}


def test_a_hard_link_then_unlink_keeps_the_file_under_its_new_name(tmp_path: Path) -> None:
    ops = [op("create", 1, payload=b"100/.tmp"), op("write", 1, 0, b"token"), op("fsync", 1),
           op("link", 1, payload=b"100/token"), op("unlink", 1, payload=b"100/.tmp"), op("fsyncdir", ROOT)]
    assert files(tmp_path, ops) == {"token": b"token"}
    assert files(tmp_path, ops, cut=5) == {".tmp": b"token"}

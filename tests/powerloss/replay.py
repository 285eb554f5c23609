"""The power-loss model: rebuild, from a :mod:`fusefs` recording, the directory tree a power cut at a chosen point
would have left on disk.

This module owns the replay (pure apart from writing the image out). The model, CrashMonkey's: after a cut at
operation ``k`` the disk holds exactly what had been made durable by a sync among the first ``k`` operations.

- A file's data (its writes and size changes) becomes durable when that file is fsync'ed or fdatasync'ed.
- The name space (create, link, unlink, rename, mkdir, rmdir) becomes durable at the next sync of anything, file or
  directory, as on ext4, whose journal commits every earlier name change with any sync.
- Writes not yet synced are lost (``mode="synced"``), or (``mode="reorder"``) each one independently reached the disk
  or not, as page writeback may do in any order, and a prefix of the unsynced name changes was committed.

Files are followed by inode incarnation, not by name: the recorded inode number of a create starts a new file (the
source file system may reuse numbers after an unlink), and a rename keeps the file. The negative control passes
``lose``, which drops chosen writes even though they were synced: the checker must then report them lost.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fusefs import LogOp

__all__ = ["Image", "replay"]

_DATA = ("write", "truncate")
_SYNC = ("fsync", "fdatasync")


@dataclass
class _Node:
    is_dir: bool
    durable: list[tuple[int, LogOp]] = field(default_factory=list)  # (op index, op), applied in order
    pending: list[tuple[int, LogOp]] = field(default_factory=list)


@dataclass
class Image:
    """The durable state at a cut: the tree (``(parent node, name) -> node``) and each node's durable data ops."""

    nodes: dict[int, _Node]
    names: dict[tuple[int, str], int]

    def paths(self) -> dict[int, str]:
        """Each reachable node's path, relative to the root ("" for the root itself)."""
        children: dict[int, list[tuple[str, int]]] = {}
        for (parent, name), node in self.names.items():
            children.setdefault(parent, []).append((name, node))
        out = {0: ""}
        todo = [0]
        while todo:
            parent = todo.pop()
            for name, node in children.get(parent, ()):
                if node not in out:
                    out[node] = os.path.join(out[parent], name)
                    todo.append(node)
        return out

    def write_to(self, dest: Path) -> None:
        """Make ``dest`` hold the image: directories, then each reachable file with its durable data."""
        dest.mkdir(parents=True, exist_ok=True)
        paths = self.paths()
        for node_id, rel in sorted(paths.items(), key=lambda kv: kv[1]):
            node = self.nodes[node_id]
            path = dest / rel if rel else dest
            if node.is_dir:
                path.mkdir(parents=True, exist_ok=True)
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for _, op in node.durable:
                    if op.kind == "write":
                        os.pwrite(fd, op.payload, op.arg)
                    else:
                        os.ftruncate(fd, op.arg)
            finally:
                os.close(fd)


def replay(ops: Sequence[LogOp], root_ino: int, cut: int, *, mode: str = "synced", seed: int = 0,
           lose: Callable[[int, LogOp], bool] | None = None) -> Image:
    """The image a power cut just before ``ops[cut]`` leaves (see the module docstring for the model)."""
    if mode not in ("synced", "reorder"):
        raise ValueError(f"unknown mode {mode!r}")
    nodes: dict[int, _Node] = {0: _Node(True)}
    current: dict[int, int] = {root_ino: 0}  # recorded inode -> its live node
    names: dict[tuple[int, str], int] = {}  # durable name space
    pending_names: list[tuple[str, tuple[int, str], tuple[int, str] | None, int]] = []

    def entry(text: str) -> tuple[int, str]:
        parent, _, name = text.partition("/")
        return current.get(int(parent), -1), name

    def commit_names() -> None:
        for kind, a, b, node in pending_names:
            _apply_name(names, kind, a, b, node)
        pending_names.clear()

    for i, op in enumerate(ops[:cut]):
        if op.kind in _DATA:
            node_id = current.get(op.ino)
            if node_id is not None:
                nodes[node_id].pending.append((i, op))
        elif op.kind in ("create", "mkdir"):
            node_id = len(nodes)
            nodes[node_id] = _Node(op.kind == "mkdir")
            current[op.ino] = node_id
            pending_names.append(("link", entry(op.payload.decode()), None, node_id))
        elif op.kind == "link":
            pending_names.append(("link", entry(op.payload.decode()), None, current.get(op.ino, -1)))
        elif op.kind in ("unlink", "rmdir"):
            pending_names.append(("unlink", entry(op.payload.decode()), None, current.get(op.ino, -1)))
        elif op.kind == "rename":
            old, new = op.payload.decode().split("\0")
            pending_names.append(("rename", entry(old), entry(new), current.get(op.ino, -1)))
        elif op.kind in _SYNC:
            node_id = current.get(op.ino)
            if node_id is not None:
                node = nodes[node_id]
                node.durable += [(j, o) for j, o in node.pending if not (lose and o.kind == "write" and lose(j, o))]
                node.pending.clear()
            commit_names()
        elif op.kind == "fsyncdir":
            commit_names()
    if mode == "reorder":
        rng = random.Random(seed)
        for node in nodes.values():
            node.durable += [(j, o) for j, o in node.pending if rng.random() < 0.5]
            node.pending.clear()
        keep = rng.randrange(len(pending_names) + 1)
        for kind, a, b, node_id in pending_names[:keep]:
            _apply_name(names, kind, a, b, node_id)
    return Image(nodes, names)


def _apply_name(names: dict[tuple[int, str], int], kind: str, a: tuple[int, str], b: tuple[int, str] | None,
                node: int) -> None:
    if kind == "link":
        names[a] = node
    elif kind == "unlink":
        if names.get(a) == node:
            del names[a]
    elif kind == "rename" and b is not None:
        if names.get(a) == node:
            del names[a]
        names[b] = node

"""``lunsync backup DIR`` against the real daemon while qemu-io writes and snapshots are taken, then the restore the
README describes, into a fresh data dir: the new daemon serves the same LUNs (same identities) and snapshots, and a
snapshot taken before the backup still reads what it held."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from api_harness import ApiDaemon
from e2e.harness import DEMO_IQN, describe, require_tools, run

pytestmark = pytest.mark.e2e
MIB = 1 << 20


def qemu(d: ApiDaemon, lun: int, command: str) -> subprocess.CompletedProcess[str]:
    return run(["qemu-io", "-f", "raw", "-c", command, d.url(lun)])


def snapshots(d: ApiDaemon) -> dict[str, tuple[str, str]]:
    return {s["name"]: (s["naa"], s["serial"]) for s in d.cli_json("snapshot", "list")}


def luns(d: ApiDaemon) -> dict[str, Any]:
    return {lun["name"]: (lun["naa"], lun["serial"], lun["size_bytes"]) for lun in d.cli_json("lun", "list")}


def restore(backup: Path, old_data: Path, new_data: Path) -> None:
    """The README's restore, step by step: the catalog, then each pool's files; the LUN files and the pools' chunk
    files are carried over as data (here, copied from the stopped array)."""
    new_data.mkdir(mode=0o700)
    shutil.copy2(backup / "catalog.db", new_data / "catalog.db")
    manifest = json.loads((backup / "backup.json").read_text())
    for pool in manifest["pools"]:
        rel = Path(pool["path"]).relative_to(old_data)  # the default pool lives in the data dir
        (new_data / rel).mkdir(parents=True, exist_ok=True)
        for name in pool["files"]:
            shutil.copy2(backup / "pools" / pool["name"] / name, new_data / rel / name)
        for cow in Path(pool["path"]).glob("lun-*.cow"):
            subprocess.run(["cp", "--sparse=always", str(cow), str(new_data / rel / cow.name)], check=True)
    shutil.copytree(old_data / "luns", new_data / "luns", copy_function=shutil.copy2)


def test_backup_during_io_and_snapshots_restores_into_a_fresh_data_dir(
        api_daemon_factory: Callable[..., ApiDaemon], tmp_path: Path) -> None:
    require_tools("qemu-io")
    d = api_daemon_factory(demo_size="64MiB")
    d.cli("lun", "create", "busy", "--size", "64MiB", check=True)
    d.cli("lun", "map", "busy", "--target", DEMO_IQN, "--lun", "1", check=True)
    p = qemu(d, 0, f"write -P 0xaa 0 {4 * MIB}")
    assert p.returncode == 0, describe(p)
    d.cli("snapshot", "create", "demo0@before", check=True)
    p = qemu(d, 0, f"write -P 0xbb 0 {4 * MIB}")  # every chunk of the region preserved before the backup
    assert p.returncode == 0, describe(p)

    stop, churning = threading.Event(), threading.Event()
    failures: list[str] = []

    def churn() -> None:
        n = 0
        while not stop.is_set():
            w = qemu(d, 1, f"write -P {n % 250 + 1:#x} {(n % 16) * MIB} {MIB}")
            s = d.cli("snapshot", "create", f"busy@s{n}")
            if w.returncode != 0 or s.returncode != 0:
                failures.append(describe(w) + describe(s))
            n += 1
            churning.set()

    before = snapshots(d)
    t = threading.Thread(target=churn)
    t.start()
    try:
        assert churning.wait(60)
        backup = tmp_path / "backup"
        out = d.cli_json("backup", str(backup))
    finally:
        stop.set()
        t.join()
    assert not failures, failures[0]
    after = snapshots(d)
    assert out["dir"] == str(backup) and [p["name"] for p in out["pools"]] == ["default"]
    assert (backup / "backup.json").exists()
    refused = d.cli("backup", str(backup))
    assert refused.returncode != 0 and "not empty" in refused.stderr, describe(refused)
    want_luns = luns(d)
    assert d.terminate() == 0

    new = ApiDaemon(tmp_path / "restored", demo=False)
    restore(backup, d.data_dir, new.data_dir)
    try:
        new.start()
        assert luns(new) == want_luns
        got = snapshots(new)
        assert before.items() <= got.items() <= after.items(), (before, got, after)
        new.cli("snapshot", "expose", "demo0@before", "--target", DEMO_IQN, "--lun", "5", check=True)
        p = run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0xaa 0 {4 * MIB}", new.url(5)])
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout + p.stderr, describe(p)
        p = run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0xbb 0 {4 * MIB}", new.url(0)])
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout + p.stderr, describe(p)
        new.assert_healthy()
    finally:
        new.close()

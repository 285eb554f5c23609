"""A write that needs a copy-on-write while the catalog cannot record the snapshot's invalidation, against the real
daemon: the catalog's WAL fails its writes (FUSE), the pool elsewhere is full.

The origin write must proceed (GOOD, the data verified by qemu-io), never BUSY. The invalidation is kept in memory
(the API shows the snapshot invalid at once) and in the pool's map log: a kill -9 before the catalog takes writes
again still brings the snapshot back invalid, and once the catalog heals it records the invalidation itself.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_harness import ApiDaemon, qemu_io
from e2e.harness import require_tools
from fusefs import FuseMount, fuse_available

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

DEMO = "iqn.2026-11.io.lunsync:demo"
MIB = 1 << 20


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ApiDaemon, FuseMount, Path]]:
    why = fuse_available()
    if why is not None:
        pytest.skip(why)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(small)], check=True)
    d = ApiDaemon(tmp_path / "daemon", demo_size="16MiB")
    try:
        with FuseMount(tmp_path / "disk", d.data_dir) as fs:
            try:
                d.start()
                yield d, fs, small
            finally:
                d.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)




def _state(d: ApiDaemon, name: str) -> str:
    with d.http() as c:
        r = c.get(f"/v1/snapshots/{name}")
        assert r.status_code == 200, r.text
        return str(r.json()["state"])


def test_the_origin_write_proceeds_and_the_invalidation_reaches_the_catalog_later(
        setup: tuple[ApiDaemon, FuseMount, Path], tmp_path: Path) -> None:
    require_tools("qemu-io")
    d, fs, small = setup
    with d.http() as c:
        assert c.post("/v1/pools", json={"name": "tiny", "path": str(small / "pool"), "create": True}).status_code == 201
        r = c.post("/v1/luns", json={"name": "o", "size": "8MiB", "path": str(tmp_path / "o.img")})
        assert r.status_code == 201, r.text
        assert c.post(f"/v1/targets/{DEMO}/luns", json={"name": "o", "lun": 1}).status_code == 201
    url = d.url(1)
    qemu_io(url, "write -P 0xaa 0 8M", "flush")
    with d.http() as c:
        assert c.post("/v1/snapshots", json={"snapshots": ["o@s1"], "pool": "tiny"}).status_code == 201
    # the catalog's WAL stops taking writes; the 2 MiB pool cannot hold 8 MiB of copies
    fs.fail("EIO", ("write", "fsync"), under="catalog.db-wal")
    out = qemu_io(url, "write -P 0xbb 0 8M", "flush", "read -P 0xbb 0 8M")
    assert "wrote 8388608" in out
    assert _state(d, "o@s1") == "invalid"  # known to the daemon although the catalog could not record it
    d.wait_for_log(r"catalog cannot record .* are invalid .*kept in pool tiny's map log")

    # a crash before the catalog heals: the pool's record brings the snapshot back invalid
    d.kill9()
    fs.heal()
    d.start()
    assert _state(d, "o@s1") == "invalid"
    qemu_io(url, "read -P 0xbb 0 8M")
    # and the catalog itself records it soon after
    deadline = time.monotonic() + 10
    while True:
        import sqlite3

        db = sqlite3.connect(f"file:{d.data_dir / 'catalog.db'}?mode=ro", uri=True)
        try:
            state = db.execute("SELECT state FROM snapshots WHERE name = 's1'").fetchone()[0]
        finally:
            db.close()
        if state == "invalid":
            break
        assert time.monotonic() < deadline, "the catalog never recorded the invalidation"
        time.sleep(0.2)
    assert os.path.exists(d.data_dir / "catalog.db")
    d.assert_healthy()

"""A snapshot pool that fills up, on a real small file system (a 6 MiB tmpfs), against the real daemon.

The fault: a differential snapshot fills its pool, the daemon restarts, and the pool cannot checkpoint its map log
into ``pool.db``. Start-up must not depend on it: every LUN is served (the full pool's origin with the data last
written, verified by qemu-io), the pool is reported with its real error, and deleting the invalid snapshot answers
204 and gives the pool's space back, so the next snapshot is valid. The start with the full pool takes about what
a normal start of the same array takes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from api_harness import ApiDaemon, qemu_io
from e2e.harness import require_tools

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

DEMO = "iqn.2026-11.io.lunsync:demo"
MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs: a pool that fills after a few dozen preserved chunks."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)




def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_pool_never_stops_start_up_and_deleting_its_snapshot_frees_it(
        api_daemon_factory: Callable[..., ApiDaemon], small_fs: Path) -> None:
    require_tools("qemu-io")
    d = api_daemon_factory()
    pool_dir = small_fs / "pool"
    with d.http() as c:
        assert c.post("/v1/pools", json={"name": "small", "path": str(pool_dir), "create": True}).status_code == 201
        assert c.post("/v1/luns", json={"name": "full0", "size": "16MiB"}).status_code == 201
        assert c.post(f"/v1/targets/{DEMO}/luns", json={"name": "full0", "lun": 1}).status_code in (200, 201)
    url = d.url(1)
    qemu_io(url, "write -P 0xaa 0 16M", "flush")
    with d.http() as c:
        r = c.post("/v1/snapshots", json={"snapshots": ["full0@before"], "pool": "small"})
        assert r.status_code == 201, r.text
    # the normal start time of this array (same LUNs, same pool, its snapshot valid), to judge the full pool's by
    t0 = time.monotonic()
    d.restart(clean=False)
    normal = time.monotonic() - t0
    qemu_io(url, "read -P 0xaa 0 64k")
    # every 64 KiB chunk must be preserved first: 16 MiB into 6 MiB, one chunk at a time so that the map log holds
    # the records of the copies that fitted when the pool runs out
    qemu_io(url, *(f"write -P 0xbb {i * 64}k 64k" for i in range(256)), "flush")
    with d.http() as c:
        snap = c.get("/v1/snapshots/full0@before").json()
    assert snap["state"] == "invalid", snap
    assert _free(small_fs) < 256 << 10, _free(small_fs)

    # the failed copy's blocks were given back; whatever else fills the file system, the pool must live with it
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(64 << 10))
        except OSError:
            pass
    assert _free(small_fs) < 64 << 10, _free(small_fs)

    # restart with the pool full: every LUN is served within the normal start time
    t0 = time.monotonic()
    d.restart(clean=False)
    started = time.monotonic() - t0
    assert started < 15, started
    # The same start as the normal one: a factor of 3 and 2 s absorb the noise of a loaded machine (both starts
    # measured 0.8-1.0 s here); a start that waits on the full pool (retrying its checkpoint, timing out on it)
    # would not fit.
    assert started < 3 * normal + 2, (started, normal)
    qemu_io(url, "read -P 0xbb 0 16M")
    qemu_io(d.url(0), "write -P 0x11 0 64k", "read -P 0x11 0 64k")
    # the real cause, not "cannot rollback - no transaction is active"
    d.wait_for_log(r"pool small is read-only: cannot checkpoint .*database or disk is full")
    assert "cannot rollback" not in d.log_text()
    with d.http() as c:
        status = c.get("/v1/status").json()
        assert status["luns"] == 2, status
        assert any("pool small is read-only" in line and "full0@before" in line for line in status["attention"]), \
            status
        # deleting the invalid snapshot on the full pool answers 204; its copies' space is back (given back at
        # start already: no live snapshot needs them)
        r = c.delete("/v1/snapshots/full0@before")
        assert r.status_code == 204, r.text
    assert _free(small_fs) > 4 * MIB, _free(small_fs)
    with d.http() as c:
        r = c.post("/v1/snapshots", json={"snapshots": ["full0@after"], "pool": "small"})
        assert r.status_code == 201, r.text
    qemu_io(url, "write -P 0xcc 0 1M", "flush")
    with d.http() as c:
        assert c.get("/v1/snapshots/full0@after").json()["state"] == "valid"
    with d.http() as c:
        assert c.get("/v1/status").json()["attention"] == []  # a checkpoint succeeded once space came back
    d.assert_healthy()

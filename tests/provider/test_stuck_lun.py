"""One LUN's storage hangs, slows down or fails (FUSE) while the rest of the array keeps its timing.

LUN 1 lives on the suite's FUSE layer, whose writes to its file hang; a qemu-io write to it is left waiting. For the
hang's duration (``FAULTS_HANG_S``, 6 s in ``make test``, 20 s in ``make faults``) another session reads 4 KiB blocks
of LUN 0 (p99 under 50 ms), an idle session receives the target's NOP-In keepalives at their interval (1 s idle, 1 s
tick), and the API answers; a command stuck behind the hang is aborted at once by ABORT TASK and never answered.
When the storage returns, the hung write completes and its data reads back; a later write to the LUN is
acknowledged and survives a kill -9.

A second test injects faults per byte range, seen by a real initiator session.

Writes into one 1 MiB range of the LUN's file answer EIO, ENOSPC or EROFS in turn: the initiator gets MEDIUM ERROR /
WRITE ERROR (03/0C/00), DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07) and DATA PROTECT / WRITE
PROTECTED (07/27/00), while writes outside the range succeed. Then every write of that LUN takes 200 ms more: another
LUN's 4 KiB reads keep a p99 under 50 ms. After healing, the data is what was acknowledged and nothing else.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_harness import ApiDaemon, qemu_io, raw_session
from e2e.harness import require_tools
from fusefs import FuseMount, fuse_available
from iscsi_scapy import (
    RESERVED_TAG,
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    cdb_read10,
    cdb_write10,
    encode_lun,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

DEMO = "iqn.2026-11.io.lunsync:demo"
MIB = 1 << 20
BLOCKS_PER_MIB = MIB // 512
HANG_S = float(os.environ.get("FAULTS_HANG_S", "6"))
CONFIG = """\
[portal]
nop_interval_s = 1
nop_timeout_s = 30
"""


@pytest.fixture
def stuck(tmp_path: Path) -> Iterator[tuple[ApiDaemon, FuseMount, Path]]:
    why = fuse_available()
    if why is not None:
        pytest.skip(why)
    mnt = tmp_path / "slow"
    with FuseMount(tmp_path / "slow-src", mnt) as fs:
        d = ApiDaemon(tmp_path / "daemon", demo_size="64MiB", config=CONFIG)
        try:
            d.start()
            yield d, fs, mnt
        finally:
            d.close()


def test_a_hung_lun_leaves_other_luns_keepalives_and_the_api_on_time(
        stuck: tuple[ApiDaemon, FuseMount, Path]) -> None:
    require_tools("qemu-io")
    d, fs, mnt = stuck
    with d.http() as c:
        r = c.post("/v1/luns", json={"name": "hung", "size": "8MiB", "path": str(mnt / "hung.img")})
        assert r.status_code == 201, r.text
        assert c.post(f"/v1/targets/{DEMO}/luns", json={"name": "hung", "lun": 1}).status_code == 201
    qemu_io(d.url(0), "write -P 0x5a 0 4M")
    reader, idle = raw_session(d, 0x400001), raw_session(d, 0x400002)
    try:
        fs.inject(("write",), file="hung.img", hang=True)
        writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 64k", d.url(1)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # the write reaches the daemon and its storage

        lat: list[float] = []
        nops: list[float] = []
        stop = time.monotonic() + HANG_S

        def read_loop() -> None:
            lba = 0
            while time.monotonic() < stop:
                t0 = time.monotonic()
                res = reader.scsi(cdb_read10(lba, 8), lun=0, read_length=4096)
                lat.append(time.monotonic() - t0)
                assert res.status == 0 and res.data == b"\x5a" * 4096
                lba = (lba + 8) % 8192
                time.sleep(0.002)

        def nop_loop() -> None:
            while time.monotonic() < stop:
                try:
                    pdu = idle.recv_pdu(timeout=max(0.1, stop - time.monotonic()))
                except (TimeoutError, OSError):
                    continue
                if isinstance(pdu, NopIn) and pdu.itt == RESERVED_TAG:
                    nops.append(time.monotonic())
                    idle.send(NopOut(immediate=1, itt=RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmd_sn=idle.cmd_sn,
                                     exp_stat_sn=idle.exp_stat_sn))

        threads = [threading.Thread(target=read_loop), threading.Thread(target=nop_loop)]
        for t in threads:
            t.start()
        api_times = []
        with d.http() as c:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                assert c.get("/v1/status", timeout=5).status_code == 200
                api_times.append(time.monotonic() - t0)
                time.sleep(0.5)
        for t in threads:
            t.join(HANG_S + 10)
        assert writer.poll() is None, "the write to the hung LUN finished while its storage hung"

        assert len(lat) > 50, len(lat)
        p99 = statistics.quantiles(lat, n=100)[98]
        assert p99 < 0.050, f"4 KiB reads of another LUN: p99 {p99 * 1e3:.1f} ms over {len(lat)} reads"
        gaps = [b - a for a, b in itertools.pairwise(nops)]
        # a NOP-In goes out once the session has been idle an interval, seen at the portal's 1 s tick: 1-2 s apart
        assert len(nops) >= HANG_S / 2 - 1 and max(gaps) < 2.5, (len(nops), gaps)
        assert max(api_times) < 1.0, api_times

        # a command stuck behind the hung storage is aborted at once (ABORT TASK: function complete), and never
        # answered afterwards, even once the storage returns
        reader.test_unit_ready(1)  # the new LUN's unit attention
        reader.test_unit_ready(1)
        itt, cmd_sn = reader.next_itt(), reader.cmd_sn
        reader.send(ScsiCommand(flags=0xA1, lun=encode_lun(1), itt=itt, expected_data_transfer_length=4096,
                                cmd_sn=cmd_sn, exp_stat_sn=reader.exp_stat_sn, cdb=cdb_write10(256, 8).ljust(16, b"\0"),
                                data=b"\x77" * 4096))
        reader.cmd_sn += 1
        time.sleep(0.3)
        tmf_itt = reader.next_itt()
        t0 = time.monotonic()
        reader.send(TaskMgmtRequest(function=1, lun=encode_lun(1), itt=tmf_itt, referenced_task_tag=itt,
                                    cmd_sn=reader.cmd_sn, exp_stat_sn=reader.exp_stat_sn, ref_cmd_sn=cmd_sn))
        tmf = reader._wait_for(tmf_itt, timeout=5)
        assert isinstance(tmf, TaskMgmtResponse) and tmf.response == 0, tmf.summary()
        assert time.monotonic() - t0 < 1.0
        reader.exp_stat_sn = tmf.stat_sn + 1

        fs.heal()
        late = reader.drain(timeout=1.0)
        assert not any(isinstance(p, ScsiResponse) and p.itt == itt for p in late), [p.summary() for p in late]
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and b"wrote 65536" in out, out
    finally:
        fs.heal()
        reader.close()
        idle.close()
    qemu_io(d.url(1), "read -P 0xcd 0 64k")
    # acknowledged after the storage came back: survives a kill -9
    qemu_io(d.url(1), "write -P 0xef 64k 64k", "flush")
    d.kill9()
    d.config_path = None  # the configuration was applied (declaratively: it names no LUN); start from the catalog
    d.start()
    qemu_io(d.url(1), "read -P 0xcd 0 64k", "read -P 0xef 64k 64k")


def test_byte_range_faults_give_their_sense_and_latency_stays_on_its_lun(
        stuck: tuple[ApiDaemon, FuseMount, Path]) -> None:
    require_tools("qemu-io")
    d, fs, mnt = stuck
    with d.http() as c:
        assert c.post("/v1/luns", json={"name": "f", "size": "4MiB", "path": str(mnt / "f.img")}).status_code == 201
        assert c.post(f"/v1/targets/{DEMO}/luns", json={"name": "f", "lun": 1}).status_code == 201
    qemu_io(d.url(1), "write -P 0x11 0 4M", "flush")
    qemu_io(d.url(0), "write -P 0x22 0 4M")
    ri = raw_session(d, 0x500001, (0, 1))
    try:
        for errname, want in (("EIO", (3, 0x0C, 0x00)), ("ENOSPC", (7, 0x27, 0x07)), ("EROFS", (7, 0x27, 0x00))):
            fs.inject(("write",), file="f.img", start=MIB, end=2 * MIB, errname=errname)
            r = ri.write10(BLOCKS_PER_MIB + 8, b"\x99" * 4096, lun=1)
            assert r.status == 0x02, (errname, r.status)
            assert r.sense_key == want[0] and r.sense[12:14] == bytes(want[1:]), (errname, r.sense.hex())
            assert ri.write10(8, b"\x33" * 4096, lun=1).status == 0  # outside the range
            fs.heal()

        fs.inject(("write",), file="f.img", delay_s=0.2)
        reader = raw_session(d, 0x500002, (0, 1))
        stop = time.monotonic() + 3
        lat: list[float] = []

        def slow_writes() -> None:
            while time.monotonic() < stop:
                assert ri.write10(16, b"\x44" * 4096, lun=1).status == 0

        t = threading.Thread(target=slow_writes)
        t.start()
        try:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                res = reader.scsi(cdb_read10(0, 8), lun=0, read_length=4096)
                lat.append(time.monotonic() - t0)
                assert res.status == 0 and res.data == b"\x22" * 4096
                time.sleep(0.002)
        finally:
            t.join(10)
            reader.close()
        fs.heal()
        p99 = statistics.quantiles(lat, n=100)[98]
        assert p99 < 0.050, f"p99 {p99 * 1e3:.1f} ms over {len(lat)} reads while the other LUN's writes took 200 ms"
    finally:
        fs.heal()
        ri.close()
    # what was acknowledged is there; the refused range kept its old data
    qemu_io(d.url(1), "read -P 0x33 4k 4k", "read -P 0x44 8k 4k", "read -P 0x11 1M 1M", "read -P 0x11 2M 2M")
    d.assert_healthy()

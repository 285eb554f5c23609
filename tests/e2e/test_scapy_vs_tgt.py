"""The raw scapy initiator against tgt, the reference target: proof that the tool the malformed-PDU tests use speaks
correct iSCSI, independent of lunsync. If these fail, suspect ``iscsi_scapy``, not the daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.harness import free_port
from iscsi_scapy import NopIn, NopOut, RawInitiator

pytestmark = pytest.mark.e2e

TGT_IQN = "iqn.2026-11.io.lunsync:tgt-reference"


@pytest.fixture(scope="module")
def tgt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if not (shutil.which("tgtd") and shutil.which("tgtadm")):
        pytest.skip("needs tgt (Debian package tgt)")
    work: Path = tmp_path_factory.mktemp("tgt")
    img = work / "lun.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    port = free_port()
    ctl = 20000 + port % 10000  # tgtd control ports stay below 32768
    log = open(work / "tgtd.log", "wb")  # noqa: SIM115 - lives as long as tgtd
    proc = subprocess.Popen(["tgtd", "-f", "-C", str(ctl), "--iscsi", f"portal=127.0.0.1:{port}"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    adm = ["tgtadm", "-C", str(ctl), "--lld", "iscsi"]
    try:
        for _ in range(50):
            if subprocess.run([*adm, "--mode", "target", "--op", "show"], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.skip(f"tgtd did not start: {(work / 'tgtd.log').read_text(errors='replace')[-500:]}")
        subprocess.run([*adm, "--mode", "target", "--op", "new", "--tid", "1", "-T", TGT_IQN], check=True)
        subprocess.run([*adm, "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", str(img)],
                       check=True)
        subprocess.run([*adm, "--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL"], check=True)
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def test_login_io_and_logout(tgt: int) -> None:
    with RawInitiator("127.0.0.1", tgt) as ini:
        ini.login(TGT_IQN)
        first = ini.test_unit_ready(lun=1)
        assert first.status == 0 or first.sense_key == 0x6
        assert ini.test_unit_ready(lun=1).status == 0
        blocks, bs = ini.read_capacity(lun=1)
        assert (blocks, bs) == ((32 << 20) // 512, 512)
        small, big = os.urandom(4096), os.urandom(300 * 1024)  # immediate data only / R2T with several Data-Out
        assert ini.write10(8, small, lun=1).status == 0
        assert ini.write10(100, big, lun=1).status == 0
        assert ini.read10(8, 8, lun=1).data == small
        read = ini.read10(100, len(big) // 512, lun=1)
        assert read.status == 0 and read.data == big
        assert ini.nop(b"echo").data == b"echo"
        assert ini.logout().response == 0


def test_framing_follows_data_segment_length(tgt: int) -> None:
    """The same framing check the lunsync malformed-PDU tests make, against the reference target."""
    with RawInitiator("127.0.0.1", tgt) as ini:
        ini.login(TGT_IQN)
        inner = NopOut(immediate=1, itt=0x62, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn, data=b"inner!!!")
        outer = NopOut(immediate=1, itt=0x61, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn,
                       data=b"outer!!!" + bytes(inner), data_segment_length=8)
        ini.send(outer)
        a, b = ini.recv_pdu(), ini.recv_pdu()
        assert isinstance(a, NopIn) and a.itt == 0x61 and a.data == b"outer!!!"
        assert isinstance(b, NopIn) and b.itt == 0x62 and b.data == b"inner!!!"

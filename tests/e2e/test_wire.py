"""The wire as an outside dissector sees it: capture real clients talking to the daemon with tshark and require that
Wireshark's iSCSI dissector finds no malformed PDU and no expert error.

The quick form captures qemu-io I/O (immediate data, R2T, multi-PDU Data-In), discovery and a few conformance
suites (task management, NOP, residuals, reservations), with and without CRC32C digests being irrelevant to the
dissector. ``LUNSYNC_WIRE_FULL=1`` captures the whole conformance suite instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e.harness import Daemon, require_tools, run, shared_dir

pytestmark = [pytest.mark.e2e]

QUICK_SUITES = "iSCSI.iSCSIResiduals.*,iSCSI.iSCSITMF.*,iSCSI.iSCSINop.*,SCSI.Read10.*,SCSI.Write10.*,SCSI.Unmap.*"
# What the dissector must not find. A segment the kernel sent again (loopback retransmits too, when a busy machine
# lets a receive queue fill) carries bytes already dissected, so Wireshark's reassembly reports an overlap on it; that
# is TCP's doing, not a PDU of lunsync's, and the first copy of those bytes is checked like any other frame.
FLAGGED = ('(_ws.malformed || _ws.expert.severity >= "error") '
           "&& !tcp.analysis.retransmission && !tcp.analysis.fast_retransmission")


def can_capture() -> bool:
    if shutil.which("tshark") is None or os.geteuid() != 0:
        return False
    p = subprocess.run(["tshark", "-D"], capture_output=True, text=True, check=False)
    return p.returncode == 0 and "lo" in p.stdout


@pytest.mark.skipif(not can_capture(), reason="needs tshark and root to capture on the loopback interface")
def test_dissector_finds_no_malformed_pdu(daemon_factory, tmp_path: Path) -> None:
    require_tools("qemu-io", "iscsi-ls", "iscsi-test-cu")
    daemon: Daemon = daemon_factory()
    cap = tmp_path / "wire.pcapng"
    sniffer = subprocess.Popen(["tshark", "-i", "lo", "-f", f"tcp port {daemon.port}", "-w", str(cap), "-q"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)  # tshark needs a moment before it sees packets
        url = daemon.url(0)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 3M", "-c", "read -P 0x3c 0 3M", "-c",
             "write -P 0x5a 7k 9k", url], check=True)
        run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{daemon.port}"], check=True)
        suites = ".*" if os.environ.get("LUNSYNC_WIRE_FULL") else QUICK_SUITES
        tool = shared_dir() / "tools" / "conformance.py"
        for suite in suites.split(","):
            run(["python3", str(tool), url, "--test", suite], timeout=900)
        time.sleep(1.0)
    finally:
        sniffer.send_signal(signal.SIGINT)
        sniffer.wait(timeout=20)
    decode = ["-d", f"tcp.port=={daemon.port},iscsi"]
    pdus = subprocess.run(["tshark", "-r", str(cap), *decode, "-Y", "iscsi", "-T", "fields", "-e", "iscsi.opcode"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert len(pdus) > 1000, f"only {len(pdus)} iSCSI PDUs were captured"
    flagged = subprocess.run(["tshark", "-r", str(cap), *decode, "-Y",
                              FLAGGED, "-T", "fields", "-e",
                              "frame.number", "-e", "iscsi.opcode", "-e", "iscsi.request_frame", "-e",
                              "iscsi.datasegmentlength", "-e", "_ws.expert.message"],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()
    edtl = dict(line.split("\t")[:2] for line in subprocess.run(
        ["tshark", "-r", str(cap), *decode, "-Y", "iscsi.opcode == 0x01", "-T", "fields", "-e", "frame.number", "-e",
         "iscsi.scsicommand.expecteddatatransferlength"], capture_output=True, text=True, check=True
    ).stdout.splitlines() if "\t" in line)
    bad = []
    for line in flagged:
        _frame, opcode, request, length, _message = (line.split("\t") + [""] * 5)[:5]
        # Wireshark's SCSI dissector raises an exception while decoding a VPD page or INQUIRY data cut short by the
        # initiator's ALLOCATION LENGTH (libiscsi asks for 64 or 255 bytes first, as SPC-4 allows). Such a Data-In
        # carries exactly the expected transfer length; that is a complete, well-formed iSCSI PDU and is allowed.
        truncated_by_initiator = opcode.startswith("0x25") and request and edtl.get(request) == length
        if not truncated_by_initiator:
            bad.append(line)
    assert not bad, "the dissector flagged frames:\n" + "\n".join(bad[:40])
    daemon.assert_healthy()

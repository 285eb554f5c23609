"""INQUIRY data of the demo LUN, as libiscsi's iscsi-inq sees it, and its stability across restarts.

Standard data must name the vendor LUNSYNC; the VPD pages a Windows or Linux host reads before it trusts a disk (0x80
serial, 0x83 NAA identifier, 0xb0 block limits, 0xb2 provisioning) must be present and describe a thin LUN with UNMAP.
The identity (serial and designators) must not change when the daemon restarts, cleanly or not: hosts key multipath
and volume identity on it. Raw pages come from :class:`RawInitiator` because iscsi-inq prints binary designators
as raw bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from e2e.harness import DEMO_IQN, Daemon, run
from iscsi_scapy import RawInitiator, cdb_inquiry

pytestmark = pytest.mark.e2e

VENDOR = "LUNSYNC"
REQUIRED_VPD_PAGES = {0x00: "SUPPORTED_VPD_PAGES", 0x80: "UNIT_SERIAL_NUMBER", 0x83: "DEVICE_IDENTIFICATION",
                      0xB0: "BLOCK_LIMITS", 0xB2: "LOGICAL_BLOCK_PROVISIONING"}
NAA_LENGTHS = {2: 8, 3: 8, 5: 8, 6: 16}  # NAA field (first nibble) -> designator length (SPC-4 §7.8.6.6)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    from e2e.harness import require_tools

    require_tools("iscsi-inq")
    d = Daemon(tmp_path_factory.mktemp("lunsync-inq"), demo_size="256MiB")
    try:
        d.start()
        yield d
    finally:
        d.close()


def inq(daemon: Daemon, page: int | None = None) -> dict[str, str]:
    """iscsi-inq output as ``key: value`` (later duplicates keep the first)."""
    args = ["iscsi-inq"] + (["-e", "1", "-c", str(page)] if page is not None else []) + [daemon.url(0)]
    p = run(args, timeout=30, check=True)
    out: dict[str, str] = {}
    for line in p.stdout.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out.setdefault(k.strip(), v.strip())
    out["_raw"] = p.stdout
    return out


def raw_vpd(daemon: Daemon, page: int) -> bytes:
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ini.login(DEMO_IQN, initiator="iqn.2026-11.io.lunsync:inq-test", isid=0x400000C00001)
        r = ini.scsi(cdb_inquiry(alloc=1024, evpd=1, page=page), read_length=1024)
        if r.status == 0x02 and r.sense_key == 0x6:  # a UNIT ATTENTION for the new nexus first
            r = ini.scsi(cdb_inquiry(alloc=1024, evpd=1, page=page), read_length=1024)
        assert r.status == 0, f"INQUIRY VPD 0x{page:02x}: status 0x{r.status:02x} sense {r.sense.hex()}"
        data = r.data
        assert data[1] == page, f"asked for VPD 0x{page:02x}, got page 0x{data[1]:02x}"
        length = int.from_bytes(data[2:4], "big")
        assert len(data) >= 4 + length, f"VPD 0x{page:02x} says {length} bytes, sent {len(data) - 4}"
        ini.logout()
        return data[: 4 + length]


def designators(page83: bytes) -> list[tuple[int, int, int, bytes]]:
    """(code set, association, designator type, designator) for each designation descriptor (SPC-4 §7.8.6)."""
    out, i = [], 4
    while i + 4 <= len(page83):
        code_set, assoc_type, length = page83[i] & 0x0F, page83[i + 1], page83[i + 3]
        out.append((code_set, (assoc_type >> 4) & 0x3, assoc_type & 0x0F, page83[i + 4 : i + 4 + length]))
        i += 4 + length
    assert i == len(page83), "designation descriptors overrun the page"
    return out


def identity(daemon: Daemon) -> tuple[bytes, bytes]:
    return raw_vpd(daemon, 0x80), raw_vpd(daemon, 0x83)


def test_standard_inquiry(daemon: Daemon) -> None:
    d = inq(daemon)
    assert d["Vendor"] == VENDOR, d["_raw"]
    assert d["Peripheral Qualifier"] == "CONNECTED", d["_raw"]
    assert d["Peripheral Device Type"] == "DIRECT_ACCESS", d["_raw"]
    assert d["Product"], d["_raw"]
    assert d["Revision"], d["_raw"]
    assert d["CmdQue"] == "1", "command queuing must be reported for an iSCSI LU"
    assert d["Removable"] == "0", d["_raw"]
    assert int(d["Version"].split()[0]) >= 5, f"claims less than SPC-3: {d['Version']}"


def test_supported_vpd_pages(daemon: Daemon) -> None:
    out = inq(daemon, 0x00)["_raw"]
    listed = {int(m, 16) for m in re.findall(r"Page:0x([0-9a-f]{2})", out)}
    missing = {f"0x{p:02x}" for p in REQUIRED_VPD_PAGES} - {f"0x{p:02x}" for p in listed}
    assert not missing, f"VPD pages missing: {missing}\n{out}"
    raw = raw_vpd(daemon, 0x00)
    pages = list(raw[4:])
    assert pages == sorted(pages), "SPC-4 §7.8.18: supported pages are listed in ascending order"


def test_unit_serial_number(daemon: Daemon) -> None:
    serial = inq(daemon, 0x80)
    m = re.search(r"Unit Serial Number:\[(.*)\]", serial["_raw"])
    assert m and m.group(1).strip(), serial["_raw"]
    raw = raw_vpd(daemon, 0x80)[4:]
    assert raw and all(0x20 <= b < 0x7F for b in raw), f"serial must be printable ASCII: {raw!r}"


def test_device_identification_has_an_naa_lu_designator(daemon: Daemon) -> None:
    text = inq(daemon, 0x83)["_raw"]
    assert "Designator Type:(3) NAA" in text and "Association:(0) LOGICAL_UNIT" in text, text
    naa = [d for cs, assoc, typ, d in designators(raw_vpd(daemon, 0x83)) if typ == 3 and assoc == 0]
    assert naa, "no NAA designator for the logical unit"
    for value in naa:
        kind = value[0] >> 4
        assert kind in NAA_LENGTHS and len(value) == NAA_LENGTHS[kind], f"malformed NAA {value.hex()}"
        assert value.rstrip(b"\0")[1:], f"NAA with no identifier bits: {value.hex()}"


def test_block_limits_advertise_unmap(daemon: Daemon) -> None:
    d = inq(daemon, 0xB0)
    assert int(d["maximum unmap lba count"]) > 0, d["_raw"]
    assert int(d["maximum unmap block descriptor count"]) > 0, d["_raw"]
    assert int(d["maximum compare and write length"]) > 0, d["_raw"]


def test_logical_block_provisioning_says_thin(daemon: Daemon) -> None:
    d = inq(daemon, 0xB2)
    assert d["lbpu"] == "1", f"UNMAP not advertised on a thin LUN\n{d['_raw']}"
    assert d["provisioning type"] == "2", f"SBC-3 §6.6.4: thin provisioning is type 2\n{d['_raw']}"


def test_identity_stable_across_clean_and_unclean_restart(daemon: Daemon) -> None:
    before = identity(daemon)
    text_before = inq(daemon, 0x80)["_raw"], inq(daemon, 0x83)["_raw"]
    daemon.restart(clean=True)
    assert identity(daemon) == before, "VPD 0x80/0x83 changed across a clean restart"
    daemon.restart(clean=False)
    assert identity(daemon) == before, "VPD 0x80/0x83 changed across kill -9 and restart"
    assert (inq(daemon, 0x80)["_raw"], inq(daemon, 0x83)["_raw"]) == text_before
    daemon.assert_healthy()

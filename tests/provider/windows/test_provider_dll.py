"""The Windows VSS hardware provider DLL (provider/windows/), run for real under Wine against the real daemon.

The cross-compiled harness plays the VSS service: it creates the provider through COM, as VSS does, and calls every
method in VSS's order over WinHTTP to the daemon on loopback, printing one JSON line per step. Between steps it
waits while this side looks at the LUNs over iSCSI the way the Windows host would: identities from VPD pages 0x80
and 0x83, data with qemu-io. The installer is run too (settings, token ACL, COM registration; Wine has no VSS
service to register with), and the DLL's exports and imports are read with objdump.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_harness import ApiDaemon
from e2e.harness import DEMO_IQN, REPO_ROOT, describe, free_port, run
from iscsi_scapy import RawInitiator, cdb_inquiry

pytestmark = pytest.mark.e2e

MIB = 1 << 20
BUILD = REPO_ROOT / "build" / "windows"
DLL, INSTALLER, HARNESS = BUILD / "lunsync-vss.dll", BUILD / "lunsync-vss.exe", BUILD / "lunsync-vss-harness.exe"
SECRET_SDDL = "D:P(A;OICI;KA;;;SY)(A;OICI;KA;;;BA)"
SETTINGS_KEY = r"HKLM\SOFTWARE\lunsync\VssProvider"
RATE_MIB_S = 16  # slow enough that a 32 MiB restore is still running while qemu-io looks at it

S_OK = "0x00000000"
VSS_S_ASYNC_PENDING, VSS_S_ASYNC_FINISHED, VSS_S_ASYNC_CANCELLED = "0x00042309", "0x0004230A", "0x0004230B"
VSS_E_PROVIDER_VETO = "0x80042306"
VSS_E_INSUFFICIENT_STORAGE = "0x8004231F"
VSS_E_RESYNC_IN_PROGRESS = "0x800423FF"

# Every method of the four interfaces; the end-to-end run must call each at least once.
METHODS = {
    "AreLunsSupported", "FillInLunInfo", "BeginPrepareSnapshot", "GetTargetLuns", "LocateLuns", "OnLunEmpty",
    "GetProviderCapabilities", "OnLunStateChange", "ResyncLuns", "OnReuseLuns", "EndPrepareSnapshots",
    "PreCommitSnapshots", "CommitSnapshots", "PostCommitSnapshots", "PreFinalCommitSnapshots",
    "PostFinalCommitSnapshots", "AbortSnapshots", "OnLoad", "OnUnload", "QueryStatus", "Wait", "Cancel",
}


# -- the build and the Wine prefix -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build() -> Path:
    """The DLL, installer and harness (`make windows`, which `make test` runs first)."""
    if not all(p.exists() for p in (DLL, INSTALLER, HARNESS)):
        if shutil.which("x86_64-w64-mingw32-g++") is None:
            pytest.skip("needs g++-mingw-w64-x86-64 (make test installs it)")
        p = run(["make", "-C", str(REPO_ROOT), "windows"], timeout=600)
        assert p.returncode == 0, describe(p)
    return BUILD


class Wine:
    """One Wine prefix of our own: runs Windows programs with Unix paths turned into Z: paths."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.env = {**os.environ, "WINEPREFIX": str(prefix), "WINEDEBUG": "-all", "WINEDLLOVERRIDES": "mscoree,mshtml="}
        self.env.pop("DISPLAY", None)

    @staticmethod
    def path(p: Path) -> str:
        return "Z:" + str(p).replace("/", "\\")

    def run(self, exe: Path | str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # Output goes through files, not pipes: a Windows service the program starts (rpcss, for an out-of-process
        # COM class) inherits its descriptors and would keep a pipe open for as long as it lives.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            p = subprocess.run(["wine", str(exe), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               env=self.env, timeout=timeout, check=False)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(p.args, p.returncode, out.read().decode(errors="replace"),
                                               err.read().decode(errors="replace"))

    def popen(self, exe: Path, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["wine", str(exe), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", env=self.env)

    def reg_set(self, key: str, name: str, value: str | int) -> None:
        kind, data = ("REG_DWORD", str(value)) if isinstance(value, int) else ("REG_SZ", value)
        p = self.run("reg", "add", key, "/v", name, "/t", kind, "/d", data, "/f")
        assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def wine(build: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wine]:
    if shutil.which("wine") is None:
        pytest.skip("needs wine64 (make test installs it)")
    w = Wine(tmp_path_factory.mktemp("wineprefix"))
    t0 = time.monotonic()
    # One wineserver for the module, started with no pipe of ours: a server that `wine` starts on demand inherits
    # the caller's stdout and holds it open after the program exits. wineboot's services inherit its descriptors too.
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(["wineserver", "-p"], env=w.env, timeout=60, check=True, **quiet)
    p = subprocess.run(["wineboot", "-i"], env=w.env, timeout=300, check=False, **quiet)
    assert p.returncode == 0, "wineboot -i failed"
    print(f"wineboot: {time.monotonic() - t0:.1f} s")
    try:
        yield w
    finally:
        subprocess.run(["wineserver", "-k"], env=w.env, timeout=60, check=False)


# -- the daemon and the LUNs as the Windows host sees them -----------------------------------------------------------


def api(d: ApiDaemon, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(method, d.api_url + path, headers={"Authorization": f"Bearer {d.api_token}"}, timeout=30, **kw)
    assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
    return r.json() if r.content else None


def inquiry(d: ApiDaemon, lun: int, page: int | None) -> bytes:
    with RawInitiator("127.0.0.1", d.port) as ini:
        ini.login(DEMO_IQN, initiator="iqn.1991-05.com.microsoft:wine-host")
        cdb = cdb_inquiry(alloc=255) if page is None else cdb_inquiry(alloc=1024, evpd=1, page=page)
        r = ini.scsi(cdb, lun=lun, read_length=1024)
        if r.status == 0x02 and r.sense_key == 0x6:  # the new nexus's UNIT ATTENTION first
            r = ini.scsi(cdb, lun=lun, read_length=1024)
        assert r.status == 0, f"INQUIRY LUN {lun} page {page}: status {r.status:#x}"
        ini.logout()
        return bytes(r.data)


def spec(d: ApiDaemon, lun: int) -> str:
    """VENDOR|PRODUCT|REVISION|SERIAL|NAA of a LUN, read over iSCSI as Windows builds its VDS_LUN_INFORMATION."""
    std = inquiry(d, lun, None)
    serial = inquiry(d, lun, 0x80)
    page83 = inquiry(d, lun, 0x83)
    naa, i = "", 4
    while i + 4 <= len(page83):
        code_set, assoc_type, length = page83[i] & 0x0F, page83[i + 1], page83[i + 3]
        if code_set == 1 and (assoc_type >> 4) & 3 == 0 and assoc_type & 0x0F == 3:
            naa = page83[i + 4:i + 4 + length].hex()
        i += 4 + length
    assert naa, f"LUN {lun} has no NAA designator"
    fields = [std[8:16], std[16:32], std[32:36], serial[4:4 + int.from_bytes(serial[2:4], "big")]]
    return "|".join(f.decode("ascii").strip() for f in fields) + "|" + naa


def qemu(d: ApiDaemon, command: str, lun: int) -> str:
    read_only = ["-r"] if command.startswith("read") else []  # exposed snapshots are write-protected
    p = run(["qemu-io", "-f", "raw", *read_only, "-c", command, d.url(lun)], timeout=120)
    assert p.returncode == 0 and "verification failed" not in p.stdout + p.stderr, describe(p)
    return p.stdout


def reads(d: ApiDaemon, lun: int, byte: int, offset: int, length: int) -> None:
    assert "read " in qemu(d, f"read -P {byte:#x} {offset} {length}", lun)


def write(d: ApiDaemon, lun: int, byte: int, offset: int, length: int) -> None:
    assert "wrote " in qemu(d, f"write -P {byte:#x} {offset} {length}", lun)


# -- installation ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(wine: Wine, api_daemon: ApiDaemon, tmp_path_factory: pytest.TempPathFactory) -> Wine:
    token = tmp_path_factory.mktemp("token") / "api-token"
    token.write_text("not-the-token\n")
    refused = wine.run(INSTALLER, "install", "--api", api_daemon.api_url, "--token-file", wine.path(token))
    assert refused.returncode == 2 and "refused the token" in refused.stderr, refused.stdout + refused.stderr
    gone = wine.run(INSTALLER, "status")
    assert gone.returncode == 2 and not json.loads(gone.stdout)["configured"], "a refused install left settings"

    token.write_text(api_daemon.api_token + "\n")
    p = wine.run(INSTALLER, "install", "--api", api_daemon.api_url, "--token-file", wine.path(token),
                 "--resync-rate", str(RATE_MIB_S), "--timeout-ms", "5000")
    # 3: settings and COM class installed; Wine has no VSS service for IVssAdmin::RegisterProvider.
    assert p.returncode == 3, p.stdout + p.stderr
    assert "capabilities 0x10c" in p.stdout and "no VSS service" in p.stdout, p.stdout
    assert "no COM+ catalog [0x80040154]" in p.stdout, p.stdout  # Wine has no COMAdminCatalog either
    # The installer reads the token key's DACL back after setting it. (A later process under Wine may see the
    # inherited default instead: Wine does not keep a key's security descriptor reliably across processes.)
    assert f"token in HKLM\\SOFTWARE\\lunsync\\VssProvider\\Secret, {SECRET_SDDL})" in p.stdout, p.stdout
    return wine


def test_installer_stores_settings_token_acl_and_com_class(installed: Wine, api_daemon: ApiDaemon) -> None:
    p = installed.run(INSTALLER, "status")
    assert p.returncode == 0, p.stdout + p.stderr
    st = json.loads(p.stdout)
    assert st["configured"] and st["token_present"] and st["api_url"] == api_daemon.api_url
    assert st["token_key_sddl"].startswith("D:"), st  # see installed(): the DACL is checked as install set it
    assert st["com_registered"] and st["dll"].lower().endswith("lunsync-vss.dll")
    assert st["clsid"] == "{F83A1AA3-D25C-446C-B046-A70FF4854FF8}"
    assert st["resync_rate_mib_s"] == RATE_MIB_S and st["timeout_ms"] == 5000
    assert not st["vss_service"] and st["vss_hresult"] == "0x80040154"  # REGDB_E_CLASSNOTREG under Wine
    t = installed.run(INSTALLER, "test")
    assert t.returncode == 0 and f"{api_daemon.api_url} answers" in t.stdout, t.stdout + t.stderr


# -- the harness -----------------------------------------------------------------------------------------------------


class Harness:
    """The harness process: its JSON lines, read as they come, and its pauses answered."""

    def __init__(self, wine: Wine, *args: str) -> None:
        self.p = wine.popen(HARNESS, *args)
        self.steps: list[dict[str, Any]] = []

    def until(self, pause: str | None, timeout: float = 90) -> list[dict[str, Any]]:
        """The steps up to the pause named (or to the end), in order."""
        assert self.p.stdout is not None
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            if not line.startswith("{"):
                continue
            step = json.loads(line)
            if step["step"] == "pause":
                assert step["name"] == pause, f"paused at {step['name']}, expected {pause}"
                return got
            got.append(step)
            self.steps.append(step)
        assert pause is None, f"no pause {pause}; steps: {got}\n{self.stderr()}"
        return got

    def go(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("\n")
        self.p.stdin.flush()

    def stderr(self) -> str:
        return self.p.stderr.read() if self.p.stderr and self.p.poll() is not None else ""

    def step(self, name: str) -> dict[str, Any]:
        found = [s for s in self.steps if s["step"] == name]
        assert found, f"no step {name}: {[s['step'] for s in self.steps]}"
        return found[-1]

    def close(self) -> int:
        try:
            return self.p.wait(60)
        finally:
            if self.p.poll() is None:
                self.p.kill()


def ok(steps: list[dict[str, Any]], *allowed: str) -> None:
    bad = [s for s in steps if s["hr"] != S_OK and s["step"] not in allowed]
    assert not bad, bad


def naa(lun_json: dict[str, Any]) -> str:
    ids = lun_json["device_id_descriptor"]["identifiers"]
    return str(next(i["identifier"] for i in ids if i["type"] == 3))


def test_vss_order_snapshot_set_resync_bed_refresh_and_cleanup(installed: Wine, api_daemon: ApiDaemon) -> None:
    d = api_daemon
    api(d, "POST", "/v1/luns", json={"name": "data1", "size": "32MiB"})
    api(d, "POST", f"/v1/targets/{DEMO_IQN}/luns", json={"name": "data1", "lun": 1})
    api(d, "POST", "/v1/luns", json={"name": "bed", "size": "16MiB"})
    api(d, "POST", f"/v1/targets/{DEMO_IQN}/luns", json={"name": "bed", "lun": 2})
    write(d, 0, 0xA1, 0, 32 * MIB)
    write(d, 1, 0xB1, 0, 32 * MIB)
    a, b, bed = spec(d, 0), spec(d, 1), spec(d, 2)

    h = Harness(installed, "full", "--lun", a, "--lun", b, "--bed", bed)
    try:
        steps = h.until("exposed")
        ok(steps)
        assert h.step("CoCreateInstance")["IVssProviderCreateSnapshotSet"]
        assert h.step("GetProviderCapabilities")["mask"] == 0x10C
        assert h.step("AreLunsSupported")["supported"] is True
        assert h.step("AreLunsSupported-foreign")["supported"] is False  # same vendor strings, not the array's
        filled = h.step("FillInLunInfo")
        assert filled["supported"] and naa(filled["lun"]) == a.rsplit("|", 1)[1]
        targets = h.step("GetTargetLuns")["luns"]
        assert len(targets) == 2 and {naa(t) for t in targets}.isdisjoint({a.split("|")[4], b.split("|")[4]})
        assert h.step("FillInLunInfo-snapshot")["supported"]

        # LocateLuns exposed both snapshots on the host's target; find them by identity, as Windows' rescan does.
        exposed = {}
        for origin, t in zip(("demo0", "data1"), targets, strict=True):
            s = next(x for x in api(d, "GET", "/v1/snapshots") if x["naa"] == naa(t))
            assert s["exposed"] and s["exposed"]["target"] == DEMO_IQN, s
            lun = s["exposed"]["lun"]
            assert spec(d, lun).rsplit("|", 1)[1] == naa(t), "the exposed LUN must carry the snapshot's identity"
            exposed[origin] = lun
        reads(d, exposed["demo0"], 0xA1, 0, 32 * MIB)
        reads(d, exposed["data1"], 0xB1, 0, 32 * MIB)
        write(d, 0, 0xA2, 0, 32 * MIB)  # the originals move on after the point in time
        write(d, 1, 0xB2, 0, 32 * MIB)
        h.go()

        steps = h.until("resyncing")
        ok(steps)
        # ResyncLuns has returned: the originals serve the snapshot at once, and take writes during the copy.
        reads(d, 0, 0xA1, 0, 32 * MIB)
        reads(d, 1, 0xB1, 0, 4 * MIB)
        write(d, 0, 0xA3, 1 * MIB, 1 * MIB)
        rs = [r for r in api(d, "GET", "/v1/recovery") if r["state"] == "resyncing"]
        assert rs and rs[0]["percent"] < 100, rs
        h.go()

        steps = h.until("restored")
        ok(steps)
        polls = [s for s in steps if s["step"] == "QueryStatus"]
        assert polls[0]["status"] == VSS_S_ASYNC_PENDING and polls[0]["percent"] < 100, polls
        assert polls[-1]["status"] == VSS_S_ASYNC_FINISHED and polls[-1]["percent"] == 100, polls
        assert h.step("QueryStatus-end")["polls"] >= 2
        reads(d, 0, 0xA1, 0, 1 * MIB)
        reads(d, 0, 0xA3, 1 * MIB, 1 * MIB)  # the write made during the restore
        reads(d, 0, 0xA1, 2 * MIB, 30 * MIB)
        reads(d, 1, 0xB1, 0, 32 * MIB)  # destination == snapshot
        reads(d, exposed["demo0"], 0xA1, 0, 32 * MIB)  # the snapshots were never written
        reads(d, exposed["data1"], 0xB1, 0, 32 * MIB)
        h.go()

        steps = h.until("bed")
        ok(steps)
        assert h.step("QueryStatus-bed")["status"] == VSS_S_ASYNC_FINISHED
        reads(d, 2, 0xA1, 0, 32 * MIB)  # the test bed, grown from 16 MiB, holds the first LUN's snapshot
        h.go()

        steps = h.until("cleaned")
        ok(steps, "ResyncLuns-in-progress", "Cancel-after-end")
        assert h.step("ResyncLuns-in-progress")["hr"] == VSS_E_RESYNC_IN_PROGRESS
        assert h.step("QueryStatus-cancelled-end")["status"] == VSS_S_ASYNC_CANCELLED
        assert h.step("Cancel-after-end")["hr"] == VSS_S_ASYNC_FINISHED
        left = [s["name"] for s in api(d, "GET", "/v1/snapshots")]
        assert not left, f"OnReuseLuns, OnLunEmpty and AbortSnapshots should have deleted every snapshot: {left}"
        h.go()

        ok(h.until(None))
        assert h.step("DllCanUnloadNow")["hr"] == S_OK, "a COM reference leaked"
        assert h.step("done")
        assert h.close() == 0
    finally:
        if h.p.poll() is None:
            h.p.kill()
    called = {s["step"].split("-")[0] for s in h.steps}
    assert METHODS <= called, f"not exercised: {sorted(METHODS - called)}"
    d.assert_healthy()


# -- error paths -----------------------------------------------------------------------------------------------------


def probe(wine: Wine, d: ApiDaemon) -> dict[str, dict[str, Any]]:
    p = wine.run(HARNESS, "probe", "--lun", spec(d, 0))
    assert p.returncode == 0, p.stdout + p.stderr
    return {s["step"]: s for s in map(json.loads, p.stdout.splitlines()) if isinstance(s, dict)}


def test_wrong_token_is_a_veto_naming_the_refusal(installed: Wine, api_daemon: ApiDaemon) -> None:
    installed.reg_set(SETTINGS_KEY + r"\Secret", "Token", "wrong-token")
    try:
        got = probe(installed, api_daemon)
    finally:
        installed.reg_set(SETTINGS_KEY + r"\Secret", "Token", api_daemon.api_token)
    for step in ("GetProviderCapabilities", "AreLunsSupported"):
        assert got[step]["hr"] == VSS_E_PROVIDER_VETO, got[step]
        assert "HTTP 401" in got[step]["error"] and api_daemon.api_url in got[step]["error"], got[step]
    assert probe(installed, api_daemon)["GetProviderCapabilities"]["hr"] == S_OK


def test_array_down_is_a_veto_naming_the_url(installed: Wine, api_daemon: ApiDaemon) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    installed.reg_set(SETTINGS_KEY, "ApiUrl", down)
    try:
        got = probe(installed, api_daemon)
    finally:
        installed.reg_set(SETTINGS_KEY, "ApiUrl", api_daemon.api_url)
    caps = got["GetProviderCapabilities"]
    assert caps["hr"] == VSS_E_PROVIDER_VETO and down in caps["error"] and "cannot connect" in caps["error"], caps


def test_stalled_array_times_out_as_a_veto(installed: Wine, api_daemon: ApiDaemon) -> None:
    """An array that accepts the connection and never answers: the call ends after TimeoutMs, it does not hang."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            srv.settimeout(0.2)
            while not stop.is_set():
                try:
                    held.append(srv.accept()[0])
                except OSError:
                    pass

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        installed.reg_set(SETTINGS_KEY, "ApiUrl", url)
        installed.reg_set(SETTINGS_KEY, "TimeoutMs", 1500)
        try:
            t0 = time.monotonic()
            got = probe(installed, api_daemon)
            elapsed = time.monotonic() - t0
        finally:
            installed.reg_set(SETTINGS_KEY, "ApiUrl", api_daemon.api_url)
            installed.reg_set(SETTINGS_KEY, "TimeoutMs", 5000)
            stop.set()
            t.join(5)
            for c in held:
                c.close()
    caps, luns = got["GetProviderCapabilities"], got["AreLunsSupported"]
    for s in (caps, luns):
        assert s["hr"] == VSS_E_PROVIDER_VETO and url in s["error"] and "timed out" in s["error"], s
    assert caps["ms"] < 5000 and elapsed < 20, (caps, elapsed)


def test_pool_full_is_insufficient_storage(installed: Wine, api_daemon: ApiDaemon, tmp_path: Path) -> None:
    """A LUN on a file system with no room for differential data: EndPrepareSnapshots refuses the set."""
    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs (make test runs as root)")
    full = tmp_path / "full"
    full.mkdir()
    p = run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)])
    assert p.returncode == 0, describe(p)
    try:
        api(api_daemon, "POST", "/v1/luns", json={"name": "tight", "size": "1GiB", "path": str(full / "tight.img")})
        api(api_daemon, "POST", f"/v1/targets/{DEMO_IQN}/luns", json={"name": "tight", "lun": 9})
        r = installed.run(HARNESS, "prepare", "--lun", spec(api_daemon, 9))
        assert r.returncode == 0, r.stdout + r.stderr
        got = {s["step"]: s for s in map(json.loads, r.stdout.splitlines())}
        assert got["BeginPrepareSnapshot"]["hr"] == S_OK
        end = got["EndPrepareSnapshots"]
        assert end["hr"] == VSS_E_INSUFFICIENT_STORAGE and "tight" in end["error"], end
        assert got["AbortSnapshots"]["hr"] == S_OK
        api(api_daemon, "DELETE", f"/v1/targets/{DEMO_IQN}/luns/tight")
        api(api_daemon, "DELETE", "/v1/luns/tight")
    finally:
        run(["umount", "-l", str(full)])


def test_uninstall_removes_the_class_and_the_settings(installed: Wine) -> None:
    p = installed.run(INSTALLER, "uninstall")
    assert p.returncode == 0, p.stdout + p.stderr
    st = json.loads(installed.run(INSTALLER, "status").stdout)
    assert not st["configured"] and not st["com_registered"], st
    h = installed.run(HARNESS, "probe", "--lun", "LUNSYNC|VIRTUAL-DISK|0001|X|60a5c517000000000000000000000000")
    assert h.returncode == 2 and "0x80040154" in h.stdout, h.stdout  # REGDB_E_CLASSNOTREG: nothing left to load


def test_dll_exports_the_com_four_and_imports_only_windows(build: Path) -> None:
    objdump = shutil.which("x86_64-w64-mingw32-objdump")
    if objdump is None:
        pytest.skip("needs binutils-mingw-w64-x86-64")
    for binary in (DLL, INSTALLER, HARNESS):
        text = run([objdump, "-p", str(binary)], check=True).stdout
        imports = {line.split(":", 1)[1].strip().lower() for line in text.splitlines() if "DLL Name:" in line}
        system = {"kernel32.dll", "advapi32.dll", "ole32.dll", "oleaut32.dll", "winhttp.dll", "msvcrt.dll",
                  "user32.dll", "rpcrt4.dll"}
        assert imports and imports <= system, f"{binary.name} imports {sorted(imports - system)}"
        assert not any(n.startswith(("libgcc", "libstdc++", "libwinpthread")) for n in imports)
    text = run([objdump, "-p", str(DLL)], check=True).stdout
    table = text[text.index("[Ordinal/Name Pointer] Table"):].splitlines()[1:]
    exports = {line.split("]", 1)[1].strip() for line in table if line.strip().startswith("[")}
    assert exports == {"DllGetClassObject", "DllCanUnloadNow", "DllRegisterServer", "DllUnregisterServer"}, exports

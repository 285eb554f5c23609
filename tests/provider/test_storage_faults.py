"""Storage faults under the catalog, against the real daemon: its data dir turns read-only, full or failing while it
runs, the API answers 503 with the OS error (never a 500 and a traceback), qemu-io keeps reading and writing a LUN
whose file is elsewhere, and the daemon takes writes again by itself once the file system does.

The data dir is the suite's FUSE passthrough (:mod:`fusefs`) because the kernel refuses to remount a file system
read-only while files on it are open for writing, and a running daemon always has the catalog open.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_harness import ApiDaemon
from e2e.harness import require_tools, run
from fusefs import FuseMount, fuse_available

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

DEMO = "iqn.2026-11.io.lunsync:demo"
MIB = 1 << 20


# What a data dir remounted read-only, a full disk and a failing one answer to every change of data.
CHANGES = ("write", "fsync", "create", "truncate", "mkdir", "unlink", "rename")


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[ApiDaemon, FuseMount]]:
    why = fuse_available()
    if why is not None:
        pytest.skip(why)
    d = ApiDaemon(tmp_path / "daemon", demo_size="16MiB")
    with FuseMount(tmp_path / "disk", d.data_dir) as fs:
        try:
            d.start()
            yield d, fs
        finally:
            d.close()


def _qemu_io(d: ApiDaemon, lun: int, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    p = run([*args, f"iscsi://127.0.0.1:{d.port}/{DEMO}/{lun}"], check=True, timeout=60)
    assert "failed" not in p.stdout.lower() and "error" not in p.stdout.lower(), p.stdout


def test_a_read_only_full_or_failing_data_dir_answers_503_and_recovers(faulty: tuple[ApiDaemon, FuseMount],
                                                                        tmp_path: Path) -> None:
    require_tools("qemu-io")
    d, fs = faulty
    # The LUN the initiator uses lives outside the data dir, on storage that stays healthy.
    outside = tmp_path / "safe.img"
    token = d.token
    with d.http() as c:
        assert c.post("/v1/luns", json={"name": "safe", "size": 4 * MIB, "path": str(outside)}).status_code == 201
        assert c.post(f"/v1/targets/{DEMO}/luns", json={"name": "safe", "lun": 1}).status_code == 201
        _qemu_io(d, 1, "write -P 0x11 0 1M")
        mark = d.log_mark()

        for mode, words, n in (("erofs", "Read-only file system", 0x22), ("enospc", "No space left on device", 0x33),
                               ("eio", "Input/output error", 0x44)):
            fs.fail(mode.upper(), CHANGES)
            for method, path, body in (("POST", "/v1/targets", {"iqn": f"iqn.2026-11.io.lunsync:fault-{mode}"}),
                                       ("POST", "/v1/luns", {"name": f"in-{mode}", "size": MIB})):
                r = c.request(method, path, json=body)
                assert r.status_code == 503, (mode, path, r.status_code, r.text)
                err = r.json()
                assert err["code"] == "unavailable" and words in err["error"], (mode, path, err)
                assert r.headers["retry-after"].isdigit()
            # What the catalog already holds is still shown.
            listed = c.get("/v1/luns")
            assert listed.status_code == 200 and "safe" in [x["name"] for x in listed.json()], listed.text
            # The CLI says the same in one line and exits with the server-error class.
            p = d.cli("target", "create", f"iqn.2026-11.io.lunsync:cli-{mode}", env={"LUNSYNC_TOKEN": token})
            assert p.returncode == 5 and words in p.stderr and "Traceback" not in p.stderr, (p.returncode, p.stderr)
            # The data path of a LUN on healthy storage does not notice.
            _qemu_io(d, 1, f"write -P {n:#x} 1M 1M", f"read -P {n:#x} 1M 1M", "read -P 0x11 0 1M")

            fs.heal()
            # Back by itself: no restart, the very next write transaction commits.
            r = c.post("/v1/targets", json={"iqn": f"iqn.2026-11.io.lunsync:fault-{mode}"})
            assert r.status_code == 201, (mode, r.text)
            r = c.post("/v1/luns", json={"name": f"in-{mode}", "size": MIB})
            assert r.status_code == 201, (mode, r.text)

        targets = [t["iqn"] for t in c.get("/v1/targets").json()]
        assert all(f"iqn.2026-11.io.lunsync:fault-{m}" in targets for m in ("erofs", "enospc", "eio"))
        # Nothing a refused request tried was half-made.
        assert not any(t.endswith(("cli-erofs", "cli-enospc", "cli-eio")) for t in targets)
    log = d.log_since(mark)
    assert "Traceback" not in log and "-> 503" in log, log[-4000:]
    d.assert_healthy()
    # And the catalog reopens cleanly from what was committed.
    d.restart(clean=True)
    with d.http() as c:
        assert {f"in-{m}" for m in ("erofs", "enospc", "eio")} <= {x["name"] for x in c.get("/v1/luns").json()}

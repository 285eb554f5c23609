"""Snapshots through the real daemon: qemu-io writes and verifies patterns over iSCSI, the ``lunsync`` CLI drives the
API, and libiscsi's iscsi-inq reads the identity of exposed snapshots."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e.harness import DEMO_IQN, Daemon, describe, free_port, lunsync_command, require_tools, run
from fusefs import FuseMount, fuse_available

pytestmark = pytest.mark.e2e
MIB = 1 << 20


def start(daemon_factory: Callable[..., Daemon], metrics: int | None = None) -> tuple[Daemon, dict[str, str]]:
    require_tools("qemu-io", "iscsi-inq")
    api = free_port()
    d = daemon_factory(extra_args=["--api", f"127.0.0.1:{api}", "--metrics",
                                   "off" if metrics is None else f"127.0.0.1:{metrics}"])
    return d, {"LUNSYNC_API": f"http://127.0.0.1:{api}", "LUNSYNC_DATA_DIR": str(d.data_dir)}


def cli(env: dict[str, str], *args: str, ok: bool = True) -> Any:
    p = run([*lunsync_command(), *args, "--json"], env=env)
    if ok:
        assert p.returncode == 0, describe(p)
        return json.loads(p.stdout)
    assert p.returncode != 0, describe(p)
    return p.stderr


def qemu(d: Daemon, lun: int, command: str, *, read_only: bool = False) -> Any:
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else []), "-c", command, d.url(lun)]
    return run(args)


def write(d: Daemon, lun: int, byte: int, offset: int = 0, length: int = MIB) -> None:
    p = qemu(d, lun, f"write -P {byte:#x} {offset} {length}")
    assert p.returncode == 0 and "wrote" in p.stdout, describe(p)


def assert_reads(d: Daemon, lun: int, byte: int, offset: int = 0, length: int = MIB) -> None:
    p = qemu(d, lun, f"read -P {byte:#x} {offset} {length}", read_only=True)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout + p.stderr, describe(p)
    assert "read " in p.stdout, describe(p)


def inquiry(d: Daemon, lun: int, page: int) -> str:
    p = run(["iscsi-inq", "-e", "1", "-c", str(page), d.url(lun)])
    assert p.returncode == 0, describe(p)
    return p.stdout


def test_write_a_snapshot_write_b_expose_reads_a_with_its_own_identity(daemon_factory: Callable[..., Daemon]
                                                                       ) -> None:
    d, env = start(daemon_factory)
    write(d, 0, 0xAA)
    created = cli(env, "snapshot", "create", "demo0@a")
    assert created["snapshots"][0]["state"] == "valid"
    write(d, 0, 0xBB)
    shown = cli(env, "snapshot", "expose", "demo0@a", "--target", DEMO_IQN, "--lun", "1")
    assert shown["exposed"] == {"target": DEMO_IQN, "lun": 1}
    assert_reads(d, 1, 0xAA)
    assert_reads(d, 0, 0xBB)
    assert inquiry(d, 0, 0x83) != inquiry(d, 1, 0x83)
    serial = inquiry(d, 1, 0x80)
    assert shown["serial"] in serial and shown["serial"] not in inquiry(d, 0, 0x80)
    refused = qemu(d, 1, "write -P 0xcc 0 4k")
    assert refused.returncode != 0 or "failed" in (refused.stdout + refused.stderr).lower(), describe(refused)
    assert_reads(d, 1, 0xAA)
    # Exposure and identity survive kill -9.
    d.restart(clean=False)
    assert_reads(d, 1, 0xAA)
    assert serial == inquiry(d, 1, 0x80)
    assert cli(env, "snapshot", "delete", "demo0@a", ok=False).count("unexpose") == 1
    d.assert_healthy()


def test_delete_in_any_order_keeps_the_others(daemon_factory: Callable[..., Daemon]) -> None:
    d, env = start(daemon_factory)
    for name, byte in (("s1", 0x11), ("s2", 0x22), ("s3", 0x33)):
        write(d, 0, byte)
        cli(env, "snapshot", "create", f"demo0@{name}")
    write(d, 0, 0x44)
    cli(env, "snapshot", "delete", "demo0@s2")
    for n, (name, byte) in enumerate((("s1", 0x11), ("s3", 0x33)), start=1):
        cli(env, "snapshot", "expose", f"demo0@{name}", "--target", DEMO_IQN, "--lun", str(n))
        assert_reads(d, n, byte)
    cli(env, "snapshot", "unexpose", "demo0@s1")
    cli(env, "snapshot", "delete", "demo0@s1")
    assert_reads(d, 2, 0x33)
    assert_reads(d, 0, 0x44)
    listed = cli(env, "snapshot", "list", "demo0")
    assert [s["name"] for s in listed] == ["demo0@s3"]
    assert listed[0]["space_bytes"] == MIB


def test_set_takes_every_lun_at_once_and_reports_the_hold(daemon_factory: Callable[..., Daemon]) -> None:
    d, env = start(daemon_factory)
    for i in (1, 2):
        cli(env, "lun", "create", f"m{i}", "--size", "16MiB")
        cli(env, "lun", "map", f"m{i}", "--target", DEMO_IQN, "--lun", str(i))
        write(d, i, 0x50 + i)
    write(d, 0, 0x50)
    r = cli(env, "snapshot", "create", "demo0@t", "m1@t", "m2@t", "--set", "nightly")
    assert r["set"] == "nightly" and 0 < r["hold_ms"] < 10_000
    assert {s["set"] for s in r["snapshots"]} == {"nightly"}
    for i in (0, 1, 2):
        write(d, i, 0x60)
    for n, lun in enumerate(("demo0", "m1", "m2"), start=3):
        cli(env, "snapshot", "expose", f"{lun}@t", "--target", DEMO_IQN, "--lun", str(n))
        assert_reads(d, n, 0x50 + n - 3)
    # The same set name twice is refused and takes nothing.
    assert "already exists" in cli(env, "snapshot", "create", "demo0@u", "--set", "nightly", ok=False)
    assert "demo0@u" not in [s["name"] for s in cli(env, "snapshot", "list")]


def test_clone_outlives_its_origin(daemon_factory: Callable[..., Daemon]) -> None:
    d, env = start(daemon_factory)
    cli(env, "lun", "create", "src", "--size", "8MiB")
    cli(env, "lun", "map", "src", "--target", DEMO_IQN, "--lun", "1")
    write(d, 1, 0xC1, 0, 8 * MIB)
    cli(env, "snapshot", "create", "src@gold", "--kind", "clone")
    write(d, 1, 0xC2, 0, 4 * MIB)  # overwrites while (or after) it fills: the clone keeps 0xC1
    deadline = time.monotonic() + 30
    while not (s := cli(env, "snapshot", "show", "src@gold"))["fill"]["complete"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert s["fill"]["percent"] == 100.0
    cli(env, "lun", "unmap", "src", "--target", DEMO_IQN)
    cli(env, "lun", "delete", "src")
    s = cli(env, "snapshot", "show", "src@gold")
    assert s["origin_present"] is False
    cli(env, "snapshot", "expose", "src@gold", "--target", DEMO_IQN, "--lun", "2")
    assert_reads(d, 2, 0xC1, 0, 8 * MIB)
    d.restart()
    assert_reads(d, 2, 0xC1, 0, 8 * MIB)


def test_origin_with_differential_snapshots_cannot_be_deleted(daemon_factory: Callable[..., Daemon]) -> None:
    _d, env = start(daemon_factory)
    cli(env, "lun", "create", "keep", "--size", "8MiB")
    cli(env, "snapshot", "create", "keep@s")
    assert "depend" in cli(env, "lun", "delete", "keep", ok=False)
    cli(env, "snapshot", "delete", "keep@s")
    cli(env, "lun", "delete", "keep")


def test_pool_full_invalidates_the_snapshot_and_the_origin_keeps_serving(daemon_factory: Callable[..., Daemon],
                                                                         tmp_path: Any) -> None:
    metrics = free_port()
    d, env = start(daemon_factory, metrics)
    pool = cli(env, "pool", "create", "tiny", "--path", str(tmp_path / "tiny"), "--create", "--capacity", "256KiB")
    assert pool["capacity_bytes"] == 256 << 10
    write(d, 0, 0x0A)
    cli(env, "snapshot", "create", "demo0@doomed", "--pool", "tiny")
    write(d, 0, 0x0B)  # 16 chunks to preserve, room for 4
    assert_reads(d, 0, 0x0B)
    s = cli(env, "snapshot", "show", "demo0@doomed")
    assert s["state"] == "invalid" and "full" in s["invalid_reason"]
    assert "invalid" in cli(env, "snapshot", "expose", "demo0@doomed", "--target", DEMO_IQN, ok=False)
    assert "demo0" in d.wait_for_log(r"snapshot demo0@doomed is now invalid").group(0)
    pools = {p["name"]: p for p in cli(env, "pool", "list")}
    assert pools["tiny"]["free_bytes"] == 0
    scrape = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
    assert 'lunsync_snapshots{state="invalid"} 1.0' in scrape
    assert 'lunsync_pool_free_bytes{pool="tiny"} 0.0' in scrape
    assert re.search(r'lunsync_cow_copies_total\{lun="demo0"\} 4\.0', scrape), scrape
    assert re.search(r'lunsync_cow_copy_failures_total\{lun="demo0"\} [1-9]', scrape), scrape
    d.assert_healthy()


def test_names_are_validated(daemon_factory: Callable[..., Daemon]) -> None:
    _d, env = start(daemon_factory)
    for bad in ("../etc@x", "demo0@../x", "demo0@a/b", "demo0"):
        cli(env, "snapshot", "create", bad, ok=False)
    assert "1-64 characters" in cli(env, "pool", "create", "../p", "--path", "/tmp/x", ok=False)
    assert cli(env, "snapshot", "list") == []



# A failing pool is the pool's problem: the pool sits on the suite's FUSE passthrough (fusefs), told to answer
# EROFS or EIO to the pool's writes and syncs; the data directory (catalog, LUN) stays on the real file system.
@pytest.fixture
def faulty_pool(tmp_path: Path) -> Iterator[FuseMount]:
    why = fuse_available()
    if why:
        pytest.skip(why)
    with FuseMount(tmp_path / "pool-src", tmp_path / "pool") as m:
        yield m


@pytest.mark.parametrize("errname", ["EROFS", "EIO"])
def test_pool_error_invalidates_the_snapshot_and_the_origin_keeps_serving(
        faulty_pool: FuseMount, daemon_factory: Callable[..., Daemon], errname: str) -> None:
    # faulty_pool comes first so that it is torn down last: the daemon, which holds the pool's files open, must stop
    # before the unmount, or the file system's process lingers until fusefs gives up on it (15 s each run).
    metrics = free_port()
    d, env = start(daemon_factory, metrics)
    cli(env, "pool", "create", "flaky", "--path", str(faulty_pool.mountpoint))
    write(d, 0, 0x0A)
    cli(env, "snapshot", "create", "demo0@kept", "--pool", "flaky")
    write(d, 0, 0x0B, 0, 128 << 10)  # two chunks preserved while the pool still works
    faulty_pool.fail(errname)
    write(d, 0, 0x0C, MIB // 2, MIB // 2)  # every chunk here needs a copy the pool cannot take
    assert_reads(d, 0, 0x0C, MIB // 2, MIB // 2)
    assert_reads(d, 0, 0x0B, 0, 128 << 10)
    s = cli(env, "snapshot", "show", "demo0@kept")
    assert s["state"] == "invalid", s
    strerror = {"EROFS": "Read-only file system", "EIO": "Input/output error"}[errname]
    assert strerror in s["invalid_reason"], s
    d.wait_for_log(rf"snapshot demo0@kept is now invalid: .*{strerror}")
    scrape: Any = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
    assert 'lunsync_snapshots{state="invalid"} 1.0' in scrape
    assert re.search(r'lunsync_cow_copy_failures_total\{lun="demo0"\} [1-9]', scrape), scrape
    # Later writes to chunks nobody needs preserved any more go straight through, and the LUN survives a restart.
    write(d, 0, 0x0D, MIB // 2, 64 << 10)
    faulty_pool.heal()
    d.restart()
    assert_reads(d, 0, 0x0D, MIB // 2, 64 << 10)
    assert cli(env, "snapshot", "show", "demo0@kept")["state"] == "invalid"
    d.assert_healthy()


@pytest.fixture
def bind_mount(tmp_path: Path) -> Iterator[Path]:
    """A bind mount of a fresh directory, which the test may remount read-only (a real EROFS file system)."""
    src, mnt = tmp_path / "bind-src", tmp_path / "bind"
    src.mkdir()
    mnt.mkdir()
    p = run(["mount", "--bind", str(src), str(mnt)])
    if p.returncode:
        pytest.skip(f"cannot bind-mount here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        run(["umount", "-l", str(mnt)])


def test_pool_read_only_at_start_up_the_origin_still_serves(daemon_factory: Callable[..., Daemon],
                                                            bind_mount: Path) -> None:
    d, env = start(daemon_factory)
    cli(env, "pool", "create", "ro", "--path", str(bind_mount))
    write(d, 0, 0x1A)
    cli(env, "snapshot", "create", "demo0@s", "--pool", "ro")
    write(d, 0, 0x1B, 0, 64 << 10)
    d.terminate()
    # The whole pool is read-only now (a file system remounted after errors, say): the daemon must still start.
    run(["mount", "-o", "remount,bind,ro", str(bind_mount)], check=True)
    d.start()
    d.wait_for_log(r"lun demo0: pool ro at .* cannot be opened")
    assert "cannot be opened" in cli(env, "snapshot", "expose", "demo0@s", "--target", DEMO_IQN, "--lun", "1",
                                     ok=False)
    write(d, 0, 0x1C, 0, MIB)
    assert_reads(d, 0, 0x1C)
    s = cli(env, "snapshot", "show", "demo0@s")
    assert s["state"] == "invalid" and "cannot be opened" in s["invalid_reason"], s
    d.assert_healthy()

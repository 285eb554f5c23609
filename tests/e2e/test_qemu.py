"""QEMU's iSCSI driver (libiscsi inside qemu-io and qemu-img) against the real daemon.

One daemon serves a target with four thin LUNs from a TOML config: two with 512-byte blocks and two with 4096-byte
blocks. qemu-io writes a pattern and reads it back with ``-P`` verification; several LUNs are written concurrently with
different patterns and then cross-checked, so data written to one LUN that lands on another is caught.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from e2e.harness import Daemon, describe, require_tools, run

pytestmark = pytest.mark.e2e

QEMU_IQN = "iqn.2026-11.io.lunsync:qemu"
MIB = 1 << 20


@dataclass(frozen=True)
class Lun:
    number: int
    name: str
    size_mib: int
    block_size: int
    pattern: int


LUNS = (
    Lun(0, "q512a", 64, 512, 0x11),
    Lun(1, "q4ka", 64, 4096, 0x22),
    Lun(2, "q512b", 96, 512, 0x33),
    Lun(3, "q4kb", 128, 4096, 0x44),
)

CONFIG = "\n".join(
    [
        *(f'[[lun]]\nname = "{lun.name}"\nsize = "{lun.size_mib}MiB"\nblock_size = {lun.block_size}\nthin = true\n'
          for lun in LUNS),
        "[[target]]",
        f'iqn = "{QEMU_IQN}"',
        "luns = [" + ", ".join(f'{{lun = {lun.number}, name = "{lun.name}"}}' for lun in LUNS) + "]",
        "",
    ]
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_tools("qemu-io", "qemu-img")
    d = Daemon(tmp_path_factory.mktemp("lunsync-qemu"), config=CONFIG, demo=False)
    try:
        d.start()
        yield d
    finally:
        d.close()


def url(daemon: Daemon, lun: Lun) -> str:
    return daemon.url(lun.number, iqn=QEMU_IQN)


def qemu_io(daemon: Daemon, lun: Lun, *commands: str) -> list[str]:
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    return [*cmd, url(daemon, lun)]


def assert_verified(p: subprocess.CompletedProcess[str], n_commands: int) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 0, describe(p)
    assert "Pattern verification failed" not in out, describe(p)
    assert "failed" not in out.lower(), describe(p)
    # qemu-io prints one "ops/sec" statistics line per successful read or write.
    assert out.count("ops/sec") == n_commands, describe(p)


@pytest.mark.parametrize("lun", LUNS[:2], ids=lambda lun: f"bs{lun.block_size}")
def test_pattern_write_then_verify(daemon: Daemon, lun: Lun) -> None:
    end = lun.size_mib * MIB - MIB
    p = run(qemu_io(daemon, lun, "write -P 0xab 0 1M", "read -P 0xab 0 1M",
                    f"write -P 0xcd {end} 1M", f"read -P 0xcd {end} 1M", "read -P 0 4M 1M"), timeout=120)
    assert_verified(p, 5)


@pytest.mark.parametrize("lun", LUNS[:2], ids=lambda lun: f"bs{lun.block_size}")
def test_unaligned_write_is_read_modify_write(daemon: Daemon, lun: Lun) -> None:
    """A 1000-byte write at byte 3000 straddles blocks; qemu does read-modify-write, and the neighbours survive."""
    base = 8 * MIB
    p = run(qemu_io(daemon, lun, f"write -P 0x01 {base} 16k", f"write -P 0x02 {base + 3000} 1000",
                    f"read -P 0x01 {base} 3000", f"read -P 0x02 {base + 3000} 1000",
                    f"read -P 0x01 {base + 4000} {16384 - 4000}"), timeout=120)
    assert_verified(p, 5)


def test_concurrent_luns_keep_their_own_data(daemon: Daemon) -> None:
    """Four qemu-io processes write four patterns to four LUNs at once; afterwards each LUN holds only its own."""
    region = "16M 8M"
    procs = [
        (lun, subprocess.Popen(qemu_io(daemon, lun, f"write -P {lun.pattern:#x} {region}",
                                       f"read -P {lun.pattern:#x} {region}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"))
        for lun in LUNS
    ]
    for lun, proc in procs:
        out, err = proc.communicate(timeout=180)
        assert_verified(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 2)
    # Cross-check after everyone has written: every LUN still reads back its own pattern, and only there.
    for lun in LUNS:
        p = run(qemu_io(daemon, lun, f"read -P {lun.pattern:#x} {region}", "read -P 0 24M 8M", "read -P 0 40M 8M"),
                timeout=120)
        assert_verified(p, 3)


@pytest.mark.parametrize("lun", LUNS, ids=lambda lun: lun.name)
def test_qemu_img_info_shows_the_configured_size(daemon: Daemon, lun: Lun) -> None:
    p = run(["qemu-img", "info", "--output=json", url(daemon, lun)], timeout=60, check=True)
    info = json.loads(p.stdout)
    assert info["virtual-size"] == lun.size_mib * MIB, info
    assert info["format"] == "raw", info


def test_daemon_clean_after_qemu(daemon: Daemon) -> None:
    daemon.assert_healthy()
    assert "login failed" not in daemon.log_text(), daemon.log_tail()

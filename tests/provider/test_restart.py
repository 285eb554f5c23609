"""Nothing the API acknowledged is lost: the issue's acceptance run, with kill -9 in the middle.

On a fresh data dir the CLI creates a target, a LUN and its mapping; qemu-io writes a pattern; the daemon is killed
with SIGKILL and started again on the same ports. The LUN, its mapping and its identity (VPD 0x80 as iscsi-inq reads
it) must still be there, and qemu-io must read the pattern back. Then ``lunsync export`` applied to an empty data dir
must give the same ``lun list --json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
from api_harness import ApiDaemon
from e2e.harness import describe, require_tools, run

pytestmark = pytest.mark.e2e

IQN = "iqn.2026-11.io.lunsync:restart"


def qemu_io(url: str, command: str) -> str:
    p = run(["qemu-io", "-f", "raw", "-c", command, url], timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Pattern verification failed" not in out and "failed" not in out.lower(), describe(p)
    return out


def serial(url: str) -> str:
    # iscsi-inq reads -c with atoi(): 0x80 must be written in decimal.
    p = run(["iscsi-inq", "-e", "1", "-c", "128", url], timeout=30, check=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("Unit Serial Number:")), None)
    assert line is not None, describe(p)
    return line.split("[", 1)[1].rstrip("]")


def test_acknowledged_changes_and_data_survive_kill_9(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    require_tools("qemu-io", "iscsi-inq")
    d = api_daemon_factory(demo=False)
    d.cli("target", "create", IQN, check=True)
    d.cli("lun", "create", "keep0", "--size", "64MiB", check=True)
    d.cli("lun", "map", "keep0", "--target", IQN, "--lun", "0", check=True)
    url = d.url(0, iqn=IQN)
    qemu_io(url, "write -P 0x5a 0 1M")
    before_serial = serial(url)
    luns_before = d.cli_json("lun", "list")
    assert luns_before[0]["serial"] == before_serial
    # One more acknowledged change right before the crash: no grace period for it to be written down.
    d.cli("acl", "add", "--target", IQN, "iqn.2026-11.test:late", check=True)
    d.cli("acl", "remove", "--target", IQN, "iqn.2026-11.test:late", check=True)
    d.cli("lun", "resize", "keep0", "--size", "80MiB", check=True)
    luns_before = d.cli_json("lun", "list")

    d.restart(clean=False)  # SIGKILL, then start on the same ports and data dir

    assert d.cli_json("lun", "list") == luns_before
    assert d.cli_json("target", "show", IQN)["luns"] == [{"lun": 0, "name": "keep0"}]
    assert d.cli_json("acl", "list", "--target", IQN) == {IQN: []}
    assert serial(url) == before_serial
    qemu_io(url, "read -P 0x5a 0 1M")
    qemu_io(url, "read -P 0x00 1M 1M")  # and nothing else was written
    qemu_io(url, "read -P 0x00 79M 1M")  # the grown tail is there and reads as zeros
    assert "Traceback" not in d.log_text()


def test_export_then_apply_into_an_empty_data_dir_reproduces_the_array(
        api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    require_tools("iscsi-inq")
    a = api_daemon_factory(demo=False)
    a.cli("target", "create", IQN, "--alias", "r", check=True)
    a.cli("target", "create", IQN + "-b", check=True)
    a.cli("lun", "create", "one", "--size", "32MiB", check=True)
    a.cli("lun", "create", "two", "--size", "16MiB", "--block-size", "4096", "--thick", check=True)
    a.cli("lun", "create", "ro", "--size", "8MiB", "--read-only", check=True)
    a.cli("lun", "map", "one", "--target", IQN, check=True)
    a.cli("lun", "map", "two", "--target", IQN, "--lun", "7", check=True)
    a.cli("lun", "map", "two", "--target", IQN + "-b", check=True)
    a.cli("acl", "add", "--target", IQN, "iqn.2026-11.test:host", check=True)
    a.cli("chap", "set", "--target", IQN, "--user", "host", "--secret", "restart-secret-9", check=True)
    exported = a.cli("export", check=True).stdout
    toml = a.workdir / "export.toml"
    toml.write_text(exported)
    os.chmod(toml, 0o600)

    b = api_daemon_factory(demo=False)
    assert b.cli_json("lun", "list") == []
    out = b.cli("apply", str(toml), check=True).stdout
    assert "change(s) applied" in out
    assert b.cli_json("lun", "list") == a.cli_json("lun", "list")
    assert b.cli_json("target", "list") == a.cli_json("target", "list")
    assert b.cli("export", check=True).stdout == exported
    # Same identity on the wire, from a different data dir.
    assert serial(b.url(0, iqn=IQN + "-b")) == serial(a.url(0, iqn=IQN + "-b"))
    assert "no changes" in b.cli("apply", str(toml), check=True).stdout
    assert json.loads(b.cli("lun", "show", "two", "--json", check=True).stdout)["thin"] is False

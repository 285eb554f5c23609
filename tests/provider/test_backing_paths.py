"""Backing paths judged on the real file, against the real daemon's API: no LUN may alias another LUN's file, the
catalog, or a pool's files; pool paths stay in the data dir; ``lun delete`` removes only what lunsync created.

Each case was a fault on the array before: a symlink in ``luns/`` made writes land on another LUN, and a later
``lun delete`` of a LUN whose path led to ``pool/pool.db`` removed the pool's database.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from api_harness import ApiDaemon
from lunsync.provider.backing_paths import inside, removable
from lunsync.snapshots.catalog import LunRecord

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

MIB = 1 << 20


def _create(api_daemon: ApiDaemon, name: str, path: str | None = None) -> tuple[int, str]:
    body: dict[str, object] = {"name": name, "size": "1MiB"}
    if path is not None:
        body["path"] = path
    with api_daemon.http() as c:
        r = c.post("/v1/luns", json=body)
    return r.status_code, r.text


def test_a_symlink_or_hard_link_to_another_luns_file_is_refused(api_daemon: ApiDaemon, tmp_path: Path) -> None:
    assert _create(api_daemon, "alias-a")[0] == 201
    luns = api_daemon.data_dir / "luns"
    (luns / "alias-b.img").symlink_to(luns / "alias-a.img")
    status, text = _create(api_daemon, "alias-b", "luns/alias-b.img")
    assert status == 409, text
    assert "backing file of lun 'alias-a'" in text
    os.link(luns / "alias-a.img", luns / "alias-c.img")
    status, text = _create(api_daemon, "alias-c", "luns/alias-c.img")
    assert status == 409, text
    # outside the data dir too: an absolute symlink elsewhere pointing back at the LUN's file
    (tmp_path / "elsewhere.img").symlink_to(luns / "alias-a.img")
    status, text = _create(api_daemon, "alias-d", str(tmp_path / "elsewhere.img"))
    assert status == 409, text
    with api_daemon.http() as c:
        names = {x["name"] for x in c.get("/v1/luns").json()}
    assert not names & {"alias-b", "alias-c", "alias-d"}


@pytest.mark.parametrize("target", ["catalog.db", "catalog.db-wal", "api-token", "pool/pool.db", "pool"])
def test_array_files_cannot_back_a_lun_by_path_or_symlink(api_daemon: ApiDaemon, target: str) -> None:
    real = api_daemon.data_dir / target
    assert real.exists(), real
    tag = target.replace("/", "-").replace(".", "-")
    status, text = _create(api_daemon, f"abs-{tag}", str(real))
    assert status == 400, text
    link = api_daemon.data_dir / "luns" / f"link-{tag}.img"
    link.symlink_to(real)
    status, text = _create(api_daemon, f"lnk-{tag}", f"luns/link-{tag}.img")
    assert status == 400, text
    assert "data dir" in text
    assert real.exists()


def test_a_file_inside_a_pool_elsewhere_is_refused(api_daemon: ApiDaemon, tmp_path: Path) -> None:
    pool_dir = tmp_path / "outside-pool"
    with api_daemon.http() as c:
        r = c.post("/v1/pools", json={"name": "outside", "path": str(pool_dir), "create": True})
        assert r.status_code == 201, r.text
    status, text = _create(api_daemon, "in-pool", str(pool_dir / "x.img"))
    assert status == 400, text
    assert "inside snapshot pool 'outside'" in text


def test_a_relative_pool_path_cannot_leave_the_data_dir(api_daemon: ApiDaemon) -> None:
    escape = api_daemon.data_dir.parent / "escaped-pool"
    with api_daemon.http() as c:
        for path in ("../escaped-pool", "pool/../../escaped-pool", "luns/sub-pool"):
            r = c.post("/v1/pools", json={"name": "esc", "path": path, "create": True})
            assert r.status_code == 400, r.text
    assert not escape.exists()


def test_delete_removes_only_a_file_lunsync_created(api_daemon: ApiDaemon, tmp_path: Path) -> None:
    luns = api_daemon.data_dir / "luns"
    adopted = luns / "adopted.img"
    adopted.write_bytes(b"\xab" * MIB)
    assert _create(api_daemon, "adopted", "luns/adopted.img")[0] == 201
    assert _create(api_daemon, "made")[0] == 201
    outside = tmp_path / "made-outside.img"
    assert _create(api_daemon, "outside", str(outside))[0] == 201
    mark = api_daemon.log_mark()
    with api_daemon.http() as c:
        for name in ("adopted", "made", "outside"):
            assert c.delete(f"/v1/luns/{name}").status_code == 204
    assert adopted.read_bytes() == b"\xab" * MIB  # the user's file, and its data, stay
    assert not (luns / "made.img").exists()
    assert outside.exists()
    api_daemon.wait_for_log(r"lun adopted deleted; kept .*adopted\.img \(lunsync did not create it there\)", since=mark)


def test_removable_needs_ownership_a_relative_path_and_a_plain_file(tmp_path: Path) -> None:
    import datetime as dt

    f = tmp_path / "f.img"
    f.write_bytes(b"x")
    (tmp_path / "l.img").symlink_to(f)

    def rec(path: str, owns: bool) -> LunRecord:
        return LunRecord("n", path, 512, 512, True, False, 65536, "6" + "0" * 31, "s",
                         dt.datetime.now(), 1, owns_file=owns)

    assert removable(rec("f.img", True), str(f))
    assert not removable(rec("f.img", False), str(f))
    assert not removable(rec(str(f), True), str(f))
    assert not removable(rec("l.img", True), str(tmp_path / "l.img"))
    assert not removable(rec("gone.img", True), str(tmp_path / "gone.img"))
    assert inside("/a/b", "/a") and inside("/a", "/a") and not inside("/ab", "/a")

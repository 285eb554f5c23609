"""The ``lunsync`` CLI as users run it: a subprocess talking to the real daemon's API.

Each test checks what the user sees (tables with human sizes, one-line errors, exit codes) and what the daemon did
(through ``--json`` or the API). Token discovery, ``--api unix:PATH`` and declarative apply/export are covered here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from api_harness import ApiDaemon, names
from e2e.harness import lunsync_command
from iscsi_scapy import RawInitiator
from lunsync.provider.config import parse_config

pytestmark = pytest.mark.e2e

DEMO = "iqn.2026-11.io.lunsync:demo"
MIB = 1 << 20


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith("lunsync: "), lines[0]
    return lines[0]


def test_target_and_lun_lifecycle(api_daemon: ApiDaemon) -> None:
    t = "iqn.2026-11.io.lunsync:cli-flow"
    d = api_daemon
    assert "created target" in d.cli("target", "create", t, "--alias", "flow", check=True).stdout
    out = d.cli("lun", "create", "flow0", "--size", "96MiB", "--block-size", "4096", "--thick", check=True).stdout
    assert "created lun flow0: 96MiB" in out
    out = d.cli("lun", "map", "flow0", "--target", t, "--lun", "3", check=True).stdout
    assert f"mapped lun flow0 on {t} as LUN 3" in out

    table = d.cli("lun", "list", check=True).stdout
    row = next(line for line in table.splitlines() if "flow0" in line)
    assert "96MiB" in row and "4096" in row and "thick" in row and f"{t} lun 3" in row
    assert "Size" in table and "Mapped on" in table

    lun = next(x for x in d.cli_json("lun", "list") if x["name"] == "flow0")
    assert lun["size_bytes"] == 96 * MIB and lun["block_size"] == 4096 and not lun["thin"]
    assert lun["mappings"] == [{"target": t, "lun": 3}]
    assert d.cli_json("target", "show", t)["luns"] == [{"lun": 3, "name": "flow0"}]
    assert "flow" in d.cli("target", "list", check=True).stdout

    assert "is now 128MiB" in d.cli("lun", "resize", "flow0", "--size", "128MiB", check=True).stdout
    assert d.cli_json("lun", "show", "flow0")["size_bytes"] == 128 * MIB
    assert (d.data_dir / "luns" / "flow0.img").stat().st_size == 128 * MIB

    p = d.cli("lun", "delete", "flow0")
    assert p.returncode == 4 and "still mapped" in one_error_line(p.stderr)  # conflict
    d.cli("lun", "unmap", "flow0", "--target", t, check=True)
    d.cli("lun", "delete", "flow0", check=True)
    d.cli("target", "delete", t, check=True)
    assert "flow0" not in names(d.cli_json("lun", "list"))
    assert t not in names(d.cli_json("target", "list"), "iqn")


@pytest.mark.parametrize(("args", "words", "rc"), [
    (("lun", "delete", "nosuch"), "nosuch", 3),
    (("lun", "resize", "demo0", "--size", "1MiB"), "cannot shrink", 1),
    (("lun", "map", "demo0", "--target", "iqn.2026-11.io.lunsync:nosuch"), "does not exist", 3),
    (("target", "create", "not-an-iqn"), "iqn", 1),
    (("acl", "add", "--target", DEMO, "bad name"), "initiator", 1),
])
def test_errors_are_one_clear_line_and_exit_by_class(api_daemon: ApiDaemon, args: tuple[str, ...], words: str,
                                                     rc: int) -> None:
    p = api_daemon.cli(*args)
    assert p.returncode == rc, p
    assert words in one_error_line(p.stderr).lower() or words in p.stderr
    assert p.stdout == ""


def test_size_syntax_is_checked_before_anything_is_sent(api_daemon: ApiDaemon) -> None:
    p = api_daemon.cli("lun", "create", "x0", "--size", "10GB")
    assert p.returncode == 2 and "ambiguous unit" in p.stderr
    for size, n in (("512M", 512 * MIB), ("1073741824", 1 << 30)):
        name = f"sz{n}"
        assert api_daemon.cli_json("lun", "create", name, "--size", size)["size_bytes"] == n
        api_daemon.cli("lun", "delete", name, check=True)


def test_unreachable_api_and_missing_or_wrong_token(api_daemon: ApiDaemon, tmp_path: Path) -> None:
    p = api_daemon.cli("status", "--api", "http://127.0.0.1:1")
    assert p.returncode == 6 and "cannot reach the API at http://127.0.0.1:1" in one_error_line(p.stderr)
    p = api_daemon.cli("status", env={"LUNSYNC_DATA_DIR": str(tmp_path)})
    assert p.returncode == 6 and "no API token" in one_error_line(p.stderr) and str(tmp_path) in p.stderr
    bad = tmp_path / "bad-token"
    bad.write_text("wrong\n")
    p = api_daemon.cli("status", "--token-file", str(bad))
    assert p.returncode == 6 and "bearer token" in one_error_line(p.stderr)


def test_token_sources(api_daemon: ApiDaemon, tmp_path: Path) -> None:
    elsewhere = {"LUNSYNC_DATA_DIR": str(tmp_path)}  # no token there
    assert api_daemon.cli("status", "--json", env={**elsewhere, "LUNSYNC_TOKEN": api_daemon.token}).returncode == 0
    tok = tmp_path / "tok"
    tok.write_text(api_daemon.token + "\n")
    assert api_daemon.cli("status", "--json", "--token-file", str(tok), env=elsewhere).returncode == 0
    assert api_daemon.cli("--data-dir", str(api_daemon.data_dir), "status", "--json", env=elsewhere).returncode == 0
    # --token-file wins over the environment.
    p = api_daemon.cli("status", "--token-file", str(tok), env={**elsewhere, "LUNSYNC_TOKEN": "wrong"})
    assert p.returncode == 0, p.stderr


def test_acl_chap_and_status_commands(api_daemon: ApiDaemon, tmp_path: Path) -> None:
    t = "iqn.2026-11.io.lunsync:cli-acl"
    d = api_daemon
    d.cli("target", "create", t, check=True)
    d.cli("acl", "add", "--target", t, "iqn.2026-11.test:one", check=True)
    d.cli("acl", "add", "--target", t, "iqn.2026-11.test:two", check=True)
    assert d.cli_json("acl", "list", "--target", t) == {t: ["iqn.2026-11.test:one", "iqn.2026-11.test:two"]}
    assert "iqn.2026-11.test:two" in d.cli("acl", "list", check=True).stdout
    d.cli("acl", "remove", "--target", t, "iqn.2026-11.test:two", check=True)
    assert d.cli_json("acl", "list")[t] == ["iqn.2026-11.test:one"]

    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-1234\n")
    d.cli("chap", "set", "--target", t, "--user", "alice", "--secret-file", str(secret_file), check=True)
    shown = d.cli("chap", "show", "--target", t, check=True).stdout
    assert "alice" in shown and "file-secret-1234" not in shown
    p = d.cli("chap", "set", "--target", t, "--user", "bob", "--json", input_text="stdin-secret-5678\n")
    assert p.returncode == 2 and "17 characters" in p.stderr and "--force" in p.stderr, p  # Windows would refuse it
    p = d.cli("chap", "set", "--target", t, "--user", "bob", "--json", "--force", input_text="stdin-secret-5678\n",
              check=True)
    assert json.loads(p.stdout) == {"enabled": True, "user": "bob", "mutual": False, "mutual_user": None}
    assert "stdin-secret-5678" not in d.cli("target", "list", "--json", check=True).stdout
    d.cli("chap", "clear", "--target", t, check=True)
    assert d.cli_json("chap", "show", "--target", t)["enabled"] is False

    status = d.cli("status", check=True).stdout
    assert d.api_url in status and str(d.data_dir) in status
    assert d.cli_json("portals")[0]["port"] == d.port


def test_session_list_and_logout(api_daemon: ApiDaemon) -> None:
    with RawInitiator("127.0.0.1", api_daemon.port) as ri:
        ri.login(DEMO, "iqn.2026-11.test:cli-session")
        table = api_daemon.cli("session", "list", check=True).stdout
        assert "iqn.2026-11.test:cli-session" in table and DEMO in table
        tsih = next(s["tsih"] for s in api_daemon.cli_json("session", "list")
                    if s["initiator"] == "iqn.2026-11.test:cli-session")
        assert f"session {tsih} logged out" in api_daemon.cli("session", "logout", str(tsih), check=True).stdout
        assert ri.is_closed(timeout=3)
    p = api_daemon.cli("session", "logout", str(tsih))
    assert p.returncode == 3 and f"no session with TSIH {tsih}" in one_error_line(p.stderr)


CONFIG = """
[[lun]]
name = "ap0"
size = "32MiB"

[[lun]]
name = "ap1"
size = "16MiB"
block_size = 4096

[[target]]
iqn = "iqn.2026-11.io.lunsync:applied"
alias = "applied"
acl = ["iqn.2026-11.test:host"]
luns = [{ lun = 0, name = "ap0" }, { lun = 1, name = "ap1" }]

[target.chap]
user = "host"
secret = "applied-secret-1"
"""


def test_apply_plans_applies_once_and_export_reproduces_it(api_daemon_factory: Callable[..., ApiDaemon], tmp_path: Path) -> None:
    d: ApiDaemon = api_daemon_factory(demo=False)
    cfg = tmp_path / "array.toml"
    cfg.write_text(CONFIG)
    plan = d.cli("apply", str(cfg), "--dry-run", check=True).stdout
    assert "+ lun ap0 32MiB" in plan and "+ map iqn.2026-11.io.lunsync:applied lun 1 -> ap1" in plan
    assert "applied-secret-1" not in plan
    assert "dry run: " in plan
    assert d.cli_json("lun", "list") == []

    out = d.cli("apply", str(cfg), check=True).stdout
    assert "change(s) applied" in out
    assert sorted(names(d.cli_json("lun", "list"))) == ["ap0", "ap1"]
    assert (d.data_dir / "luns" / "ap1.img").stat().st_size == 16 * MIB
    assert "no changes" in d.cli("apply", str(cfg), check=True).stdout
    assert d.cli_json("apply", str(cfg), "--dry-run")["changed"] is False

    exported = d.cli("export", check=True).stdout
    back = parse_config(exported)
    want = parse_config(CONFIG)
    assert [(x.name, x.size_bytes, x.block_size) for x in back.luns] == [(x.name, x.size_bytes, x.block_size)
                                                                         for x in want.luns]
    assert back.targets == want.targets  # ACL, mappings and CHAP (secret included) survive the round trip
    assert all(x.naa and x.serial for x in back.luns), "export pins the identities"

    # Declarative: dropping a LUN from the file removes it (and its file in the data dir).
    smaller = CONFIG.replace('[[lun]]\nname = "ap1"\nsize = "16MiB"\nblock_size = 4096\n', "").replace(
        ', { lun = 1, name = "ap1" }', "")
    cfg.write_text(smaller)
    # ... unless snapshots still reference it: the dry run names them, the real apply is refused and changes nothing.
    d.cli("snapshot", "create", "ap1@keep", check=True)
    plan = d.cli("apply", str(cfg), "--dry-run", check=True).stdout
    assert "! lun ap1 cannot be removed, kept by its snapshots (ap1@keep): delete them first" in plan, plan
    assert "- map iqn.2026-11.io.lunsync:applied lun 1 -> ap1" in plan and "- lun ap1" not in plan, plan
    assert "dry run: 1 change(s) would be made" in plan and "apply would be refused: 1 step(s)" in plan, plan
    p = d.cli("apply", str(cfg))
    assert p.returncode == 4, p
    line = one_error_line(p.stderr)
    assert "lun 'ap1' cannot be removed: kept by its snapshots (ap1@keep)" in line and "FOREIGN" not in line, line
    assert sorted(names(d.cli_json("lun", "list"))) == ["ap0", "ap1"]
    again = d.cli("apply", str(cfg), "--dry-run", check=True).stdout
    assert "- map iqn.2026-11.io.lunsync:applied lun 1 -> ap1" in again, "the refused apply kept the mapping too"
    d.cli("snapshot", "delete", "ap1@keep", check=True)
    out = d.cli("apply", str(cfg), check=True).stdout
    assert "- lun ap1" in out
    assert names(d.cli_json("lun", "list")) == ["ap0"]
    assert not (d.data_dir / "luns" / "ap1.img").exists()


def test_pool_create_wants_an_existing_directory_unless_told_to_create_it(api_daemon: ApiDaemon,
                                                                          tmp_path: Path) -> None:
    where = tmp_path / "not-yet"
    p = api_daemon.cli("pool", "create", "later", "--path", str(where))
    assert p.returncode == 1, p
    line = one_error_line(p.stderr)
    assert f"pool path {where} does not exist" in line and "--create" in line, line
    assert not where.exists()
    p = api_daemon.cli("pool", "create", "later", "--path", str(where), "--create", check=True)
    assert f"created pool later at {where}" in p.stdout, p
    assert where.is_dir()
    assert api_daemon.cli("pool", "delete", "later").returncode == 0


def test_apply_reports_config_errors_with_file_and_line(api_daemon: ApiDaemon, tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text('[[lun]]\nname = "t0"\nsize = "8MiB"\nread_onyl = true\n')
    p = api_daemon.cli("apply", str(cfg))
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert f"{cfg}:4" in line and "read_onyl" in line


def test_every_command_speaks_json(api_daemon: ApiDaemon) -> None:
    t = "iqn.2026-11.io.lunsync:cli-json"
    d = api_daemon
    for args in (("target", "create", t), ("lun", "create", "js0", "--size", "4MiB"),
                 ("lun", "map", "js0", "--target", t), ("lun", "list"), ("lun", "show", "js0"),
                 ("lun", "resize", "js0", "--size", "8MiB"), ("acl", "add", "--target", t, "iqn.2026-11.test:j"),
                 ("acl", "list"), ("acl", "remove", "--target", t, "iqn.2026-11.test:j"),
                 ("chap", "show", "--target", t), ("session", "list"), ("status",), ("portals",), ("export",),
                 ("target", "list"), ("lun", "unmap", "js0", "--target", t), ("lun", "delete", "js0"),
                 ("target", "delete", t)):
        p = d.cli(*args, "--json")
        assert p.returncode == 0, (args, p.stderr)
        json.loads(p.stdout)  # raises when a command prints anything but JSON


def test_api_on_a_unix_socket(api_daemon_factory: Callable[..., ApiDaemon], tmp_path_factory: pytest.TempPathFactory) -> None:
    sock = tmp_path_factory.mktemp("sock") / "api.sock"
    d: ApiDaemon = api_daemon_factory(api=f"unix:{sock}")
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    st = d.cli_json("status")
    assert st["api"] == f"unix:{sock}" and st["luns"] == 1
    p = d.cli("status", env={"LUNSYNC_TOKEN": "wrong"})
    assert p.returncode == 6 and "bearer token" in p.stderr


def test_api_over_tls(api_daemon_factory: Callable[..., ApiDaemon], tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    d = api_daemon_factory(extra_args=["--api-tls-cert", str(cert), "--api-tls-key", str(key)])
    https = f"https://127.0.0.1:{d.api_port}"
    st = d.cli_json("status", "--api", https, "--cacert", str(cert))
    assert st["api"] == https
    p = d.cli("status", "--api", https)
    assert p.returncode == 6 and "--cacert" in one_error_line(p.stderr)
    p = d.cli("status", "--api", f"http://127.0.0.1:{d.api_port}")
    assert p.returncode == 6, "plain HTTP must not reach a TLS API"


def test_under_json_errors_are_json_too(api_daemon: ApiDaemon) -> None:
    p = api_daemon.cli("lun", "delete", "nosuch", "--json")
    assert p.returncode == 3 and p.stdout == "", p
    err = json.loads(p.stderr)
    assert err["code"] == "not_found" and err["status"] == 404 and "nosuch" in err["error"]
    p = api_daemon.cli("status", "--json", "--api", "http://127.0.0.1:1")
    assert p.returncode == 6 and json.loads(p.stderr)["code"] == "unreachable"


def test_a_closed_pipe_ends_the_listing_quietly(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    with d.http() as c:
        for i in range(60):
            assert c.post("/v1/luns", json={"name": f"pipe{i:02d}", "size": "1MiB"}).status_code == 201
    env = {**os.environ, "LUNSYNC_API": d.api_url, "LUNSYNC_DATA_DIR": str(d.data_dir)}
    # `head -1` exits after one line; the CLI then writes into a closed pipe.
    lunsync = " ".join(lunsync_command())
    for extra in ("", " --json"):
        script = f"{lunsync} lun list{extra} | head -1; echo status=${{PIPESTATUS[0]}} >&2"
        p = subprocess.run(["bash", "-c", script],
                           capture_output=True, text=True, env=env, timeout=60, check=False)
        assert len(p.stdout.splitlines()) == 1, p.stdout
        assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
        assert int(p.stderr.rsplit("status=", 1)[1]) in (0, 141), p.stderr  # 0: it all fit in the pipe first
        # A reader that is gone before the first write: the closed pipe is certain, not a race with head.
        p = subprocess.run(["bash", "-c", f"{lunsync} lun list{extra} | true; echo status=${{PIPESTATUS[0]}} >&2"],
                           capture_output=True, text=True, env=env, timeout=60, check=False)
        assert p.stderr.strip() == "status=141", p.stderr
    with d.http() as c:
        for i in range(60):
            c.delete(f"/v1/luns/pipe{i:02d}")


def test_validation_errors_name_the_argument_in_words(api_daemon: ApiDaemon) -> None:
    p = api_daemon.cli("snapshot", "create", "demo0")
    assert p.returncode == 1, p
    line = one_error_line(p.stderr)
    assert "snapshots[0] 'demo0': not a snapshot name: write LUN@SNAP" in line, line
    assert "wrong syntax" not in line and "snapshots.0" not in line
    with api_daemon.http() as c:
        r = c.post("/v1/pools", json={"name": "bad name", "path": "/tmp"})
        assert r.status_code == 422 and r.json()["error"].startswith("name 'bad name': not a valid name"), r.text


def test_every_table_shows_sizes_for_people(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    out = d.cli("pool", "list", check=True).stdout + d.cli("lun", "list", check=True).stdout
    # No size is a five-digit-plus count of a small unit (264212084KiB).
    assert not re.search(r"\d{5,}(?:\.\d+)?[KMGT]iB", out), out
    assert re.search(r"\d+(?:\.\d)?[KMGTP]iB", out), out


def test_labels_on_luns_and_snapshots(api_daemon: ApiDaemon) -> None:
    d = api_daemon
    d.cli("lun", "create", "tag0", "--size", "8MiB", "--label", "env=prod", "--label", "tier=db", check=True)
    d.cli("lun", "create", "tag1", "--size", "8MiB", "--label", "env=test", check=True)
    assert d.cli_json("lun", "show", "tag0")["labels"] == {"env": "prod", "tier": "db"}
    assert names(d.cli_json("lun", "list", "--label", "env=prod")) == ["tag0"]
    assert names(d.cli_json("lun", "list", "--label", "env=prod", "--label", "tier=web")) == []
    table = d.cli("lun", "list", "--label", "tier=db", check=True).stdout
    assert "Labels" in table and "env=prod,tier=db" in table and "tag1" not in table

    out = d.cli("lun", "label", "tag1", "env=prod", "owner=ops", check=True).stdout
    assert "lun tag1 labels: env=prod,owner=ops" in out
    d.cli("lun", "label", "tag1", "owner-", check=True)
    assert d.cli_json("lun", "show", "tag1")["labels"] == {"env": "prod"}
    p = d.cli("lun", "label", "tag1", "bad key=x")
    assert p.returncode != 0 and "label key 'bad key' is not valid" in p.stderr, p.stderr
    p = d.cli("lun", "create", "tag2", "--size", "8MiB", "--label", "novalue")
    assert p.returncode != 0 and "key=value" in p.stderr, p.stderr

    d.cli("snapshot", "create", "tag0@a", "tag1@a", "--label", "keep=7d", check=True)
    d.cli("snapshot", "create", "tag0@b", check=True)
    d.cli("snapshot", "label", "tag0@b", "keep=1d", check=True)
    assert sorted(names(d.cli_json("snapshot", "list", "--label", "keep=7d"))) == ["tag0@a", "tag1@a"]
    assert names(d.cli_json("snapshot", "list", "tag0", "--label", "keep=1d")) == ["tag0@b"]
    d.cli("snapshot", "label", "tag0@b", "keep-", check=True)
    assert d.cli_json("snapshot", "show", "tag0@b")["labels"] == {}
    for s in ("tag0@a", "tag1@a", "tag0@b"):
        d.cli("snapshot", "delete", s, check=True)
    for lun in ("tag0", "tag1"):
        d.cli("lun", "delete", lun, check=True)

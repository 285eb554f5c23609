"""The CLI's pure parts: sizes for people, exit statuses by class of failure, ``--version``."""

from __future__ import annotations

import pytest
from lunsync.provider import cli


@pytest.mark.parametrize(("n", "text"), [
    (0, "0B"), (512, "512B"), (1536, "1.5KiB"), (10 << 30, "10GiB"), (264212084 << 10, "252GiB"),
    (100_000_000, "95.4MiB"), ((1 << 40) + (1 << 39), "1.5TiB"), (1 << 50, "1PiB"), (1023, "1023B"),
])
def test_human_size_reads_at_a_glance(n: int, text: str) -> None:
    assert cli.human_size(n) == text


@pytest.mark.parametrize(("status", "code", "rc"), [
    (400, "invalid", 1), (422, "invalid", 1), (None, "usage", 2), (404, "not_found", 3), (409, "conflict", 4),
    (500, "internal", 5), (503, "unavailable", 5), (None, "unreachable", 6), (None, "auth", 6), (401, "x", 6),
    (403, "forbidden", 6),
])
def test_exit_status_by_class(status: int | None, code: str, rc: int) -> None:
    assert cli.exit_status(status, code) == rc


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("lunsync ") and out.split()[1][0].isdigit()


def test_chap_secret_lengths_windows_refuses_are_refused_before_sending(capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNSYNC_TOKEN", "t" * 32)
    # No daemon runs at port 1: a refusal that happened only after sending would say "cannot reach" and exit 6.
    argv = ["chap", "set", "--target", "iqn.2026-11.io.lunsync:x", "--user", "u", "--api", "http://127.0.0.1:1"]
    for secret in ("short", "x" * 17):
        assert cli.main([*argv, "--secret", secret]) == 2
        err = capsys.readouterr().err
        assert f"{len(secret)} characters" in err and "12 to 16" in err
    assert cli.main([*argv, "--secret", "x" * 17, "--force"]) == 6
    assert "cannot reach" in capsys.readouterr().err

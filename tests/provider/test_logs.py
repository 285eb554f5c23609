"""Log output: JSON lines with time, level, logger and message (and the traceback), the level filter, and the real
daemon under ``--log-format json`` and ``--log-level``."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from e2e.harness import Daemon
from lunsync.provider.logs import configure


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_fields_and_the_traceback(restore_logging: None) -> None:
    out = io.StringIO()
    configure("info", "json", out)
    log = logging.getLogger("lunsync.test")
    log.debug("not shown")
    log.info("portal %s up", "127.0.0.1:3260")
    try:
        raise OSError("disk gone")
    except OSError:
        log.exception("flush failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["message"] for r in lines] == ["portal 127.0.0.1:3260 up", "flush failed"]
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "lunsync.test"
    assert lines[0]["time"].endswith("Z") and "T" in lines[0]["time"]
    assert "OSError: disk gone" in lines[1]["exception"] and lines[1]["level"] == "error"


def test_text_format_and_the_level_filter(restore_logging: None) -> None:
    out = io.StringIO()
    configure("warning", "text", out)
    logging.getLogger("lunsync.test").info("quiet")
    logging.getLogger("lunsync.test").warning("loud")
    assert out.getvalue().count("\n") == 1 and "WARNING lunsync.test: loud" in out.getvalue()
    with pytest.raises(ValueError, match="log level"):
        configure("verbose")
    with pytest.raises(ValueError, match="log format"):
        configure("info", "xml")


@pytest.mark.e2e
def test_daemon_logs_json_lines_at_the_level_asked(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(extra_args=["--log-format", "json"])
    d.terminate()
    records = [json.loads(line) for line in d.log_text().splitlines() if line.startswith("{")]
    assert any(r["logger"] == "lunsync.daemon" and "iSCSI portal listening" in r["message"] for r in records), records
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    # Every log line is JSON: the only other lines are what serve prints for the operator on stdout (and the
    # harness's own start markers).
    others = [line for line in d.log_text().splitlines() if line and not line.startswith(("{", " ", "lunsync:", "====="))]
    assert not others, others
    quiet = daemon_factory(extra_args=["--log-format", "json", "--log-level", "warning"])
    quiet.terminate()
    assert not [line for line in quiet.log_text().splitlines() if '"level": "info"' in line]

"""Unit tests for lunsync.provider.shared_luns' settings and the serve options that make them."""

from __future__ import annotations

import pytest
from lunsync.provider import cli
from lunsync.provider.shared_luns import GatewaySettings


def test_settings_are_checked() -> None:
    assert GatewaySettings("gw-a", 1).lease_s == 10
    for gw, group, lease in (("-x", 1, 10), ("a b", 1, 10), ("gw", 0, 10), ("gw", 65536, 10), ("gw", 1, 1)):
        with pytest.raises(ValueError):
            GatewaySettings(gw, group, lease_s=lease)


@pytest.mark.parametrize("argv", [["serve", "--gateway", "gw-a"], ["serve", "--port-group", "2"],
                                  ["serve", "--gateway", "gw a", "--port-group", "2"],
                                  ["serve", "--gateway", "gw-a", "--port-group", "2", "--lease", "0"]])
def test_serve_refuses_incomplete_or_bad_gateway_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gateway" in err or "gateway id" in err or "lease" in err

"""The CLI's client side without a daemon: where the token and the API are found, and what the errors say."""

from __future__ import annotations

from pathlib import Path

import pytest
from lunsync.provider.client import ClientError, Endpoint, find_token, quote


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LUNSYNC_TOKEN", "LUNSYNC_DATA_DIR", "LUNSYNC_API"):
        monkeypatch.delenv(var, raising=False)


def test_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "api-token").write_text("from-data-dir\n")
    file = tmp_path / "tok"
    file.write_text("from-file\n")
    assert find_token(None, str(data)) == "from-data-dir"
    monkeypatch.setenv("LUNSYNC_DATA_DIR", str(data))
    assert find_token() == "from-data-dir"
    monkeypatch.setenv("LUNSYNC_TOKEN", "from-env")
    assert find_token(None, str(data)) == "from-env"
    assert find_token(str(file), str(data)) == "from-file"


def test_missing_and_empty_tokens_say_where_they_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClientError, match=r"no API token at \./lunsync-data/api-token: set LUNSYNC_TOKEN"):
        find_token()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClientError, match="is empty"):
        find_token(str(tmp_path / "empty"))


@pytest.mark.parametrize(("spec", "url", "uds"), [
    (None, "http://127.0.0.1:8080", None),
    ("127.0.0.1:9999", "http://127.0.0.1:9999", None),
    ("https://array.example:8443/", "https://array.example:8443", None),
    ("unix:/run/lunsync/api.sock", "http://lunsync", "/run/lunsync/api.sock"),
])
def test_endpoints(spec: str | None, url: str, uds: str | None) -> None:
    e = Endpoint.parse(spec)
    assert (e.url, e.uds) == (url, uds)


def test_endpoint_from_environment_and_bad_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNSYNC_API", "unix:/tmp/x.sock")
    assert Endpoint.parse(None).uds == "/tmp/x.sock"
    with pytest.raises(ClientError, match="http://HOST:PORT"):
        Endpoint.parse("ftp://host")
    with pytest.raises(ClientError, match="needs a socket path"):
        Endpoint.parse("unix:")


def test_unreachable_api_is_one_clear_error() -> None:
    from lunsync.provider.client import Client

    with Client(Endpoint.parse("http://127.0.0.1:1"), "t", timeout_s=2) as c, \
            pytest.raises(ClientError, match=r"cannot reach the API at http://127\.0\.0\.1:1") as info:
        c.get("/status")
    assert info.value.status is None


def test_path_segments_keep_iqn_punctuation() -> None:
    assert quote("iqn.2026-11.io.lunsync:demo") == "iqn.2026-11.io.lunsync:demo"
    assert quote("a/b c") == "a%2Fb%20c"

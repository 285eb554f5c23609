"""The client side of the management API: where the daemon is, which token to present, and one call per request.

This module owns how the ``lunsync`` CLI finds the API (``--api URL``, ``LUNSYNC_API``, ``unix:PATH``) and its token
(``--token-file``, ``LUNSYNC_TOKEN``, or ``api-token`` in the data dir from ``--data-dir``, ``LUNSYNC_DATA_DIR`` or
``./lunsync-data``), and turns every failure (no daemon, no token, a 4xx) into a :class:`ClientError` whose message is
the one line the CLI prints. It knows nothing about tables or terminals.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any, Self

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8080"
DEFAULT_DATA_DIR = "./lunsync-data"
TOKEN_FILENAME = "api-token"


class ClientError(Exception):
    """A request that did not succeed. ``status`` is the HTTP status, or None when the API was not reached; ``code``
    is the error body's code word (``not_found``, ``conflict``, a VSS error, ...), or for failures before any answer
    ``unreachable`` (no daemon there), ``auth`` (no usable token) or ``usage`` (a malformed address); ``body`` is the
    API's error body as it came."""

    def __init__(self, message: str, status: int | None = None, *, code: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or ("unreachable" if status is None else "error")
        self.body = body

    def as_dict(self) -> dict[str, Any]:
        """The error as the CLI prints it under ``--json``: the API's body when there was one."""
        out: dict[str, Any] = dict(self.body or {})
        out.update(error=str(self), code=self.code)
        if self.status is not None:
            out["status"] = self.status
        return out


def find_token(token_file: str | None = None, data_dir: str | None = None) -> str:
    """The bearer token: ``token_file`` if given, else ``$LUNSYNC_TOKEN``, else ``<data dir>/api-token``."""
    if token_file is None:
        env = os.environ.get("LUNSYNC_TOKEN", "").strip()
        if env:
            return env
        base = data_dir or os.environ.get("LUNSYNC_DATA_DIR") or DEFAULT_DATA_DIR
        token_file = os.path.join(base, TOKEN_FILENAME)
        hint = ("set LUNSYNC_TOKEN, pass --token-file, or point --data-dir / LUNSYNC_DATA_DIR at the daemon's "
                "data dir")
    else:
        hint = "check --token-file"
    try:
        with open(token_file, encoding="ascii") as f:
            token = f.read().strip()
    except FileNotFoundError:
        raise ClientError(f"no API token at {token_file}: {hint}", code="auth") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(f"cannot read the API token {token_file}: {getattr(e, 'strerror', None) or e}",
                          code="auth") from None
    if not token:
        raise ClientError(f"{token_file} is empty: {hint}", code="auth")
    return token


@dataclass
class Endpoint:
    """Where the API is: an ``http(s)://`` base URL, or a unix socket path."""

    url: str
    uds: str | None = None

    @classmethod
    def parse(cls, spec: str | None) -> Endpoint:
        text = (spec or os.environ.get("LUNSYNC_API") or DEFAULT_API_URL).strip()
        if text.startswith("unix:"):
            path = text[5:]
            path = path.removeprefix("//")
            if not path:
                raise ClientError(f"bad API address {text!r}: unix: needs a socket path", code="usage")
            return cls("http://lunsync", path)
        if "://" not in text:
            text = "http://" + text  # "127.0.0.1:8080", as `serve --api` spells it
        if not text.startswith(("http://", "https://")):
            raise ClientError(f"bad API address {text!r}: use http://HOST:PORT, https://HOST:PORT or unix:PATH",
                              code="usage")
        return cls(text.rstrip("/"))

    def __str__(self) -> str:
        return f"unix:{self.uds}" if self.uds else self.url


class Client:
    """A synchronous client of ``/v1`` (the CLI makes one request per command, so there is nothing to overlap)."""

    def __init__(self, endpoint: Endpoint, token: str, *, cacert: str | None = None, timeout_s: float = 120.0) -> None:
        self.endpoint = endpoint
        verify: ssl.SSLContext | bool = True
        if cacert:
            try:
                verify = ssl.create_default_context(cafile=cacert)
            except (OSError, ssl.SSLError) as e:
                raise ClientError(f"cannot load CA certificate {cacert}: {e}", code="usage") from None
        transport = httpx.HTTPTransport(uds=endpoint.uds, verify=verify) if endpoint.uds else None
        self.location: str | None = None  # the last answer's Location: where an accepted (202) job is followed
        self.http = httpx.Client(base_url=endpoint.url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=timeout_s, verify=verify, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer (None for 204). Raises :class:`ClientError` with the API's own message."""
        try:
            r = self.http.request(method, "/v1" + path, json=json, params=params)
        except httpx.TransportError as e:
            reason = str(e) or type(e).__name__
            hint = ("trust its certificate with --cacert FILE or LUNSYNC_CACERT" if "CERTIFICATE" in reason.upper()
                    else "is `lunsync serve` running? set --api or LUNSYNC_API")
            raise ClientError(f"cannot reach the API at {self.endpoint}: {reason} ({hint})") from None
        self.location = r.headers.get("location")
        if r.status_code == 204:
            return None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.is_success:
            return body
        error_body = body if isinstance(body, dict) else None
        message = error_body.get("error") if error_body else None
        if not isinstance(message, str):
            message = r.text.strip()[:200] or r.reason_phrase
        if r.status_code == 401:
            message += " (the token is in the daemon's <data-dir>/api-token)"
        code = error_body.get("code") if error_body else None
        raise ClientError(message, r.status_code, code=code if isinstance(code, str) else "error", body=error_body)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any = None) -> Any:
        return self.request("PATCH", path, json=body)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, json=body)

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params=params or None)


def quote(segment: str) -> str:
    """One path segment, escaped (IQNs carry ':' and '.', which are legal; anything else is encoded)."""
    from urllib.parse import quote as q

    return q(segment, safe=":.-_~@")

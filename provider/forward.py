"""An HTTP request of the management API as it travels from the control process to the worker that answers it.

With ``serve --workers`` every worker runs the same FastAPI app over its own :class:`~lunsync.provider.daemon.Array`,
and the control's public API forwards each request there instead of re-implementing the operations. The control has
already checked the token and the body's size; it sends the method, path, query string, headers and body as the
params of one ``http`` :class:`~lunsync.provider.rpc.Call`, and the worker runs them through its ASGI app in-process
(:func:`run_asgi`: no socket, no second HTTP server) and replies with the status, headers and body. Bodies travel as
base64 because the JSON frame carries text. Only this wire form and the in-process runner live here; which worker
gets a request is :mod:`lunsync.provider.routing`'s decision.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from lunsync.provider.rpc import Json

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The headers a worker's app looks at or a client needs back; the rest (the token above all) stay with the control.
_REQUEST_HEADERS = frozenset({"content-type", "accept"})
_RESPONSE_HEADERS = frozenset({"content-type", "location", "retry-after", "www-authenticate"})


class BadForward(ValueError):
    """Params of an ``http`` call that are not a request (a bug on the control's side: answered 500)."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client: str | None = None

    def to_params(self) -> dict[str, Json]:
        return {"method": self.method, "path": self.path, "query": self.query,
                "headers": [list(h) for h in self.headers], "body": base64.b64encode(self.body).decode("ascii"),
                "client": self.client}

    @classmethod
    def from_params(cls, p: dict[str, Json]) -> HttpRequest:
        try:
            headers = tuple((str(k), str(v)) for k, v in p["headers"])
            return cls(str(p["method"]), str(p["path"]), str(p["query"]), headers,
                       base64.b64decode(str(p["body"]), validate=True),
                       None if p.get("client") is None else str(p["client"]))
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise BadForward(f"not a forwarded request: {e}") from None

    @classmethod
    def from_scope(cls, scope: Scope, body: bytes) -> HttpRequest:
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())
                        if k.decode("latin-1").lower() in _REQUEST_HEADERS)
        client = scope.get("client")
        return cls(str(scope.get("method", "GET")), str(scope.get("path", "/")),
                   bytes(scope.get("query_string", b"")).decode("latin-1"), headers, body,
                   str(client[0]) if client else None)

    def json(self) -> Json:
        """The body as JSON, None when it is not (the worker's app answers that with its 422)."""
        try:
            return json.loads(self.body) if self.body else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def to_result(self) -> dict[str, Json]:
        return {"status": self.status, "headers": [list(h) for h in self.headers],
                "body": base64.b64encode(self.body).decode("ascii")}

    @classmethod
    def from_result(cls, r: Json) -> HttpResponse:
        try:
            return cls(int(r["status"]), tuple((str(k), str(v)) for k, v in r["headers"]),
                       base64.b64decode(str(r["body"]), validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise BadForward(f"not a forwarded response: {e}") from None

    @classmethod
    def of_json(cls, status: int, value: Json, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
        return cls(status, (("content-type", "application/json"), *headers),
                   json.dumps(value, separators=(",", ":")).encode())

    def json(self) -> Json:
        try:
            return json.loads(self.body) if self.body else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    async def send(self, send: Send) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


async def run_asgi(app: AsgiApp, req: HttpRequest) -> HttpResponse:
    """Run ``req`` through ``app`` in this process and collect what it answers."""
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
        "query_string": req.query.encode("latin-1"), "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers]
        + [(b"content-length", str(len(req.body)).encode())],
        "client": (req.client, 0) if req.client else None, "server": None,
    }
    given = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        # The client is the control, which waits for the answer: it never disconnects mid-request.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    status = 500
    headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []

    async def send(msg: MutableMapping[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = int(msg["status"])
            for k, v in msg.get("headers", ()):
                name = bytes(k).decode("latin-1").lower()
                if name in _RESPONSE_HEADERS:
                    headers.append((name, bytes(v).decode("latin-1")))
        elif msg["type"] == "http.response.body":
            chunks.append(bytes(msg.get("body", b"")))

    await app(scope, receive, send)
    return HttpResponse(status, tuple(headers), b"".join(chunks))

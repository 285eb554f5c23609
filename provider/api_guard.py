"""The management API's guards against unbounded input and token guessing, as ASGI middleware ahead of routing.

This module owns two limits. :class:`BodyLimit` answers 413 to a request whose body is larger than the limit before
any of it is read when the client declares its length, and stops reading (then answers 413) when a chunked body
grows past it, so a 100 MB JSON document is never buffered or parsed. :func:`auth_throttle` gives the token check the
same per-source tarpit the iSCSI portal uses for failed logins (:class:`lunsync.target.throttle.LoginThrottle`): a
client address that failed authentication more than ten times in a minute has its next requests held, for a delay
growing with each further failure, before the token is even compared. Nothing is banned, so the token's holder
behind the same address still gets in, only slower.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from lunsync.target.throttle import LoginThrottle

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 1 << 20


def auth_throttle() -> LoginThrottle:
    """The API's failed-authentication tarpit: the iSCSI portal's rule (ten free failures a minute per source, then
    0.25 s more per failure, at most 5 s)."""
    return LoginThrottle()


def client_source(scope: Scope) -> str:
    """The key a client is throttled by: its address without the port (a new connection is the same client)."""
    client = scope.get("client")
    return str(client[0]) if client else "unix"


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 and is not read. ``overrides`` maps a path to its
    own limit (the declarative ``apply`` carries a whole configuration)."""

    def __init__(self, app: AsgiApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 overrides: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = overrides or {}

    def _message(self, limit: int) -> str:
        return f"request body larger than {limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get(str(scope.get("path", "")), self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _refuse(send, 400, "Content-Length is not a number")
                    return
                if declared > limit:
                    await _refuse(send, 413, self._message(limit))
                    return
                break
        # A chunked body (or a Content-Length the client then exceeds) is counted as it arrives.
        seen = 0
        overflowed = False
        started = False

        async def counted_receive() -> Message:
            nonlocal seen, overflowed
            if overflowed:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Tell the app the client went away: it stops reading, and the answer below is the 413.
                    overflowed = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflowed and not started:
                return  # whatever the app answers to a "disconnect" is not the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not overflowed:
                raise
        if overflowed and not started:
            await _refuse(send, 413, self._message(limit))

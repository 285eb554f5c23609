"""The messages between the control process and its workers, and their codec: length-prefixed JSON over a unix socket.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON, one object with a ``kind``. There are four
kinds, each a frozen dataclass: :class:`Call` asks the other side to do something and is answered by exactly one
:class:`Reply` with the same ``id`` (a result, or an error with the HTTP status the API answers with; a result of
raw bytes, a snapshot's blocks, follows its frame as it is, since base64 inside JSON costs more CPU than the copy); :class:`Notice`
tells something and wants no answer (a session that ended, a worker that is ready); :class:`HandOff` carries a logged-in
session (:class:`lunsync.target.handoff.SessionState`) and travels with its socket as SCM_RIGHTS ancillary data. JSON
because every value here already is JSON for the REST API, a length prefix because a stream has no message
boundaries. :class:`FrameDecoder` is fed whatever the socket delivered and returns whole messages; anything malformed
raises :class:`RpcError`, never another exception. No I/O: the asyncio edge that owns the sockets lives with the
processes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from lunsync.target.handoff import HandOffError, SessionState

_LEN = struct.Struct(">I")
# Large enough for a hand-off carrying a whole receive buffer of pipelined commands (1 MiB, as base64) and for any
# API answer; small enough that a corrupt length cannot make a process allocate gigabytes.
MAX_FRAME = 8 * 1024 * 1024

Json = Any  # what json.loads returns: dict, list, str, int, float, bool or None


class RpcError(ValueError):
    """A frame that is not a well-formed message: the channel is broken and is closed."""


@dataclass(frozen=True, slots=True)
class Call:
    """Ask the other side to run ``method`` with ``params``; answered by one Reply with this ``id``."""

    id: int
    method: str
    params: dict[str, Json] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of Call ``id``: ``result`` when ``error`` is None, else ``error`` and its HTTP ``status``. A
    ``result`` that is ``bytes`` (a snapshot's blocks) travels as themselves after the JSON, not inside it."""

    id: int
    result: Json | bytes = None
    error: str | None = None
    status: int = 200


@dataclass(frozen=True, slots=True)
class Notice:
    """One-way news, e.g. ``session-closed`` with the TSIH, or ``ready`` from a worker that has loaded its LUNs."""

    event: str
    params: dict[str, Json] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HandOff:
    """A session whose login is done, for the worker owning its target; the socket travels with this frame."""

    state: SessionState


Message = Call | Reply | Notice | HandOff


def encode(msg: Message) -> bytes:
    """One frame: the length, then the JSON object."""
    if isinstance(msg, Call):
        obj: dict[str, Json] = {"kind": "call", "id": msg.id, "method": msg.method, "params": msg.params}
    elif isinstance(msg, Reply):
        if isinstance(msg.result, bytes):
            if len(msg.result) > MAX_FRAME:
                raise RpcError(f"reply data of {len(msg.result)} bytes exceeds the {MAX_FRAME}-byte limit")
            obj = {"kind": "reply", "id": msg.id, "result": None, "error": msg.error, "status": msg.status,
                   "blob": len(msg.result)}
            head = json.dumps(obj, separators=(",", ":")).encode()
            return b"".join((_LEN.pack(len(head)), head, msg.result))
        obj = {"kind": "reply", "id": msg.id, "result": msg.result, "error": msg.error, "status": msg.status}
    elif isinstance(msg, Notice):
        obj = {"kind": "notice", "event": msg.event, "params": msg.params}
    else:
        obj = {"kind": "handoff", "state": msg.state.to_wire()}
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise RpcError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _LEN.pack(len(body)) + body


_KEYS = {
    "call": {"kind", "id", "method", "params"},
    "reply": {"kind", "id", "result", "error", "status"},
    "notice": {"kind", "event", "params"},
    "handoff": {"kind", "state"},
}


def decode_body(body: bytes) -> Message | _Blob:
    """The message in one frame's JSON (without its length prefix); a reply whose data follow the frame is a
    ``_Blob`` header, which :class:`FrameDecoder` completes."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RpcError(f"frame is not JSON: {e}") from None
    except RecursionError:
        raise RpcError("frame nests too deeply") from None
    if not isinstance(obj, dict):
        raise RpcError("frame is not a JSON object")
    kind = obj.get("kind")
    want = _KEYS.get(kind) if isinstance(kind, str) else None
    if want is None:
        raise RpcError(f"unknown message kind {kind!r}")
    if set(obj) != want and not (kind == "reply" and set(obj) == want | {"blob"}):
        raise RpcError(f"{kind} message has fields {sorted(obj)}, expected {sorted(want)}")
    if kind == "call":
        return Call(_int(obj, "id"), _str(obj, "method"), _obj(obj, "params"))
    if kind == "reply":
        error = obj["error"]
        if error is not None and not isinstance(error, str):
            raise RpcError("reply field 'error' is neither text nor null")
        status = _int(obj, "status")
        if not 100 <= status <= 599:
            raise RpcError(f"reply status {status} is not an HTTP status")
        if "blob" in obj:
            if obj["result"] is not None or error is not None:
                raise RpcError("a reply with data has no other result and no error")
            # The data follow the frame: FrameDecoder reads them into ``result``.
            return _Blob(_int(obj, "id"), _int(obj, "blob"), status)
        return Reply(_int(obj, "id"), obj["result"], error, status)
    if kind == "notice":
        return Notice(_str(obj, "event"), _obj(obj, "params"))
    try:
        return HandOff(SessionState.from_wire(obj["state"]))
    except HandOffError as e:
        raise RpcError(str(e)) from None


def _int(obj: dict[str, Json], key: str) -> int:
    v = obj[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise RpcError(f"field {key!r} is not a non-negative integer")
    return v


def _str(obj: dict[str, Json], key: str) -> str:
    v = obj[key]
    if not isinstance(v, str) or not v:
        raise RpcError(f"field {key!r} is not a non-empty string")
    return v


def _obj(obj: dict[str, Json], key: str) -> dict[str, Json]:
    v = obj[key]
    if not isinstance(v, dict):
        raise RpcError(f"field {key!r} is not an object")
    return v


@dataclass(frozen=True, slots=True)
class _Blob:
    """A reply's header whose ``size`` bytes of data follow it on the stream."""

    id: int
    size: int
    status: int


class FrameDecoder:
    """Whole messages out of a byte stream, however it was cut."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._blob: _Blob | None = None  # a reply whose data are still arriving

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        while True:
            blob = self._blob
            if blob is not None:
                if len(buf) < blob.size:
                    break
                out.append(Reply(blob.id, bytes(buf[:blob.size]), None, blob.status))
                del buf[:blob.size]
                self._blob = None
                continue
            if len(buf) < _LEN.size:
                break
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_FRAME:
                raise RpcError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            if len(buf) < _LEN.size + n:
                break
            body = bytes(buf[_LEN.size:_LEN.size + n])
            del buf[:_LEN.size + n]
            msg = decode_body(body)
            if isinstance(msg, _Blob):
                if msg.size > MAX_FRAME:
                    raise RpcError(f"reply data of {msg.size} bytes exceeds the {MAX_FRAME}-byte limit")
                self._blob = msg
                continue
            out.append(msg)
        return out

    @property
    def buffered(self) -> int:
        """Bytes of a frame not yet complete (a channel that closes with some is cut mid-message)."""
        return len(self._buf) + (1 if self._blob is not None else 0)

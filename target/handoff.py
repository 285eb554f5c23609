"""A logged-in session as it travels from the process that ran its login to the process that serves it.

With one event loop per core, the portal that accepts and logs in cannot be the process that owns the target (a
listening socket cannot route by target name, and SO_REUSEPORT picks a process before the login says which target is
wanted). So the login runs where the portal is, and the socket goes to the target's owner together with a
:class:`SessionState`: the login result (negotiated keys, ISID/TSIH/CID, the initiator's identity and how it
authenticated), the sequence numbers the first Login Request started and the login advanced (StatSN, ExpCmdSN,
MaxCmdSN), the final Login Response when it is still to be sent, and whatever bytes arrived after the final Login
Request and were not parsed. :func:`capture` takes it from a connection in ``HANDED_OFF``; :func:`adopt` puts it into a
fresh connection of the owner, which resolves the target by name in its own directory. The wire form is a plain JSON
object (bytes as base64), so :mod:`lunsync.provider.rpc` frames it like any other message. No I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass
from typing import Any

from lunsync.target import keys, pdu
from lunsync.target.connection import Connection, Phase
from lunsync.target.directory import Directory
from lunsync.target.errors import LoginStatus
from lunsync.target.login import LoginResult
from lunsync.target.pdu import Op

_PARAM_FIELDS = {f.name: f.type for f in dataclasses.fields(keys.NegotiatedParams)}


class HandOffError(ValueError):
    """A session state that cannot be adopted: malformed, or naming a target this process does not serve."""


@dataclass(frozen=True, slots=True)
class SessionState:
    """Everything a connection of another process needs to carry on a session that completed its login."""

    initiator_name: str
    initiator_alias: str
    isid: int
    tsih: int
    cid: int
    target_name: str
    params: keys.NegotiatedParams
    auth: str
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    peer: str
    outgoing: bytes  # the final Login Response (framed), for the new owner to send first
    pending: bytes  # received after the final Login Request, not parsed yet

    def to_wire(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["params"] = dataclasses.asdict(self.params)
        d["outgoing"] = base64.b64encode(self.outgoing).decode("ascii")
        d["pending"] = base64.b64encode(self.pending).decode("ascii")
        return d

    @classmethod
    def from_wire(cls, d: object) -> SessionState:
        """The inverse of :meth:`to_wire`; anything missing, extra or of the wrong type raises HandOffError."""
        if not isinstance(d, dict):
            raise HandOffError("session state is not an object")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if set(d) != set(fields):
            raise HandOffError(f"session state fields {sorted(set(d) ^ set(fields))} missing or unknown")
        out: dict[str, Any] = {}
        for name, kind in fields.items():
            v = d[name]
            if name == "params":
                out[name] = _params(v)
            elif name in ("outgoing", "pending"):
                out[name] = _b64(name, v)
            else:
                out[name] = _typed(name, kind, v)
        return cls(**out)


def _typed(name: str, kind: object, v: object) -> Any:
    want: type = {"int": int, "bool": bool, "str": str, "str | None": str}.get(str(kind), object)
    if v is None and str(kind).endswith("| None"):
        return None
    # bool is an int in Python; a JSON true where a number belongs is still a type error.
    if not isinstance(v, want) or (want is int and isinstance(v, bool)):
        raise HandOffError(f"session state field {name!r}: expected {kind}, got {type(v).__name__}")
    if isinstance(v, int) and not 0 <= v <= 0xFFFF_FFFF_FFFF:  # the widest is the 48-bit ISID
        raise HandOffError(f"session state field {name!r} out of range")
    return v


def _params(v: object) -> keys.NegotiatedParams:
    if not isinstance(v, dict) or set(v) != set(_PARAM_FIELDS):
        raise HandOffError("session state field 'params' does not hold the negotiated parameters")
    return keys.NegotiatedParams(**{k: _typed(f"params.{k}", kind, v[k]) for k, kind in _PARAM_FIELDS.items()})


def _b64(name: str, v: object) -> bytes:
    if not isinstance(v, str):
        raise HandOffError(f"session state field {name!r} is not base64 text")
    try:
        return base64.b64decode(v.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise HandOffError(f"session state field {name!r} is not base64 text") from None


def capture(conn: Connection, outgoing: bytes) -> SessionState:
    """The state of ``conn``, which has just stopped at HANDED_OFF; ``outgoing`` is what it queued and did not send."""
    r = conn.result
    if conn.phase is not Phase.HANDED_OFF or r is None or r.target is None:
        raise HandOffError("only a normal session stopped at HANDED_OFF can be handed off")
    seq = conn.seq
    return SessionState(r.initiator_name, r.initiator_alias, r.isid, r.tsih, r.cid, r.target.name, r.params, r.auth,
                        seq.stat_sn, seq.exp_cmd_sn, seq.max_cmd_sn, conn.peer, outgoing, conn.unparsed())


def adopt(conn: Connection, state: SessionState, directory: Directory, now: float) -> None:
    """Make the fresh connection ``conn`` serve ``state``'s session; the target must be one of ``directory``'s."""
    target = directory.lookup(state.target_name)
    if target is None:
        raise HandOffError(f"target {state.target_name} is not served here")
    result = LoginResult(state.initiator_name, state.initiator_alias, state.isid, state.tsih, state.cid, False,
                         target, state.params, state.auth)
    conn.adopt(result, state.stat_sn, state.exp_cmd_sn, state.max_cmd_sn, state.pending, now)


def refusal(state: SessionState, status: LoginStatus) -> bytes:
    """The Login Response to send instead of ``state``'s final one when no process can take the session: the same
    ITT and sequence numbers, no TSIH, and the error ``status`` (RFC 7143 §11.13.5: SERVICE_UNAVAILABLE asks the
    initiator to retry later). Login Responses are never digested, so this is the whole frame."""
    bhs = state.outgoing[:pdu.BHS_LEN]
    if len(bhs) < pdu.BHS_LEN or bhs[0] & 0x3F != Op.LOGIN_RSP:
        raise HandOffError("the session state holds no final Login Response to answer in its place")

    def word(at: int) -> int:
        return int.from_bytes(bhs[at:at + 4], "big")

    return pdu.encode_login_response(
        transit=False, cont=False, csg=(bhs[1] >> 2) & 3, nsg=0, isid=state.isid, tsih=0, itt=word(16),
        stat_sn=word(24), exp_cmd_sn=word(28), max_cmd_sn=word(32), status_class=status >> 8,
        status_detail=status & 0xFF, length=0)

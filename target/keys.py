"""iSCSI text keys: the key=value wire format and the operational negotiation (RFC 7143 §6, §13; RFC 7144 §2).

This module owns three things. :func:`parse_text`/:func:`encode_text` turn the NUL-separated ``key=value`` data of
Login and Text PDUs into pairs and back, enforcing the §6.1 syntax limits. :data:`KEYS` is every RFC 7143 key as data
(default, kind, result rule, scope, use, bounds), in the SPDK manner. :class:`Negotiator` applies those rules to an
initiator's offers and returns the target's answers, then hands the result over as a typed, frozen
:class:`NegotiatedParams`. Authentication keys (``CHAP_*`` and the other methods' keys) belong to
:mod:`lunsync.target.chap` and the login machine; ``SendTargets`` belongs to the session layer. Nothing here does I/O.

Decisions the RFC leaves open, taken once here:

* An out-of-range or ill-formed value of a known key is answered ``Reject`` (§6.2.2 allows Reject or an
  admissible value) and the key keeps its default.
* Offering the reserved words ``Reject``, ``Irrelevant`` or ``NotUnderstood`` as a value, negotiating a key twice
  in one login (§6: "MUST be detected"), or sending a key only a target may send is a protocol error:
  :class:`NegotiationError`, login status 0x0200.
* A leading-only key on a non-leading connection is answered ``Irrelevant``: the session already has its value.
* A key whose Use forbids the current phase (a login-only key in a full-feature Text Request, ``SendTargets``
  during login) is answered ``Reject``.
* IFMarker/OFMarker are answered ``No`` (§13.25 allows No; RFC 3720 initiators expect a Boolean), and
  IFMarkInt/OFMarkInt ``Reject`` (§13.25 requires it).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# -- errors -------------------------------------------------------------------------------------------------------------


class TextError(ValueError):
    """The text data is not well-formed ``key=value`` data (RFC 7143 §6.1)."""


class NegotiationError(Exception):
    """The initiator broke a negotiation rule; the login fails with ``status_class``/``status_detail``."""

    def __init__(self, reason: str, status_class: int = 0x02, status_detail: int = 0x00) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_class = status_class
        self.status_detail = status_detail


# Login status details this module raises (RFC 7143 §11.13.5), class 0x02.
_INITIATOR_ERROR = 0x00
_SESSION_TYPE_NOT_SUPPORTED = 0x09

# -- the text format (RFC 7143 §6.1) ------------------------------------------------------------------------------------

MAX_KEY_BYTES = 63
MAX_SIMPLE_VALUE_BYTES = 255
MAX_LARGE_VALUE_BYTES = 8192
MAX_NAME_BYTES = 223  # iSCSI names, RFC 7143 §4.2.7.1

NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"
# §6.2: these may only be used as answers; "None" is legal in list offers.
RESERVED_ANSWERS = frozenset({NOT_UNDERSTOOD, IRRELEVANT, REJECT})

# Standard labels are letters, digits and ".-+@_", starting with a letter (§6.1; iSCSIProtocolLevel starts lowercase).
# Public extension keys are X#<standard-label> (§13.5.2); vendor keys X-<reversed DNS> fit the standard form.
_KEY_RE = re.compile(r"(?:[A-Za-z][A-Za-z0-9.\-+@_]*|X#[A-Za-z][A-Za-z0-9.\-+@_]*)\Z")
_DECIMAL_RE = re.compile(r"[0-9]{1,20}\Z")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]{1,16}\Z")

# Keys the RFC lets appear more than once in one text: a SendTargets response lists many targets and addresses.
REPEATABLE_KEYS = frozenset({"TargetName", "TargetAddress"})
# Authentication keys (§12) are handled by the security stage, never by the Negotiator.
AUTH_KEY_PREFIXES = ("CHAP_", "SRP_", "KRB_", "SPKM_")
# large-binary-value keys (CHAP_C, CHAP_R, ...) and vendor keys, whose length the RFC does not cap at 255 bytes.
_LARGE_VALUE_PREFIXES = AUTH_KEY_PREFIXES + ("X-", "X#")


def is_auth_key(name: str) -> bool:
    """True for keys of an authentication method (RFC 7143 §12), which the login machine routes to CHAP."""
    return name.startswith(AUTH_KEY_PREFIXES)


def max_value_bytes(name: str) -> int:
    """The longest value of key ``name`` (§6.1: 255 bytes unless the key says otherwise)."""
    return MAX_LARGE_VALUE_BYTES if name.startswith(_LARGE_VALUE_PREFIXES) else MAX_SIMPLE_VALUE_BYTES


def _show(raw: bytes) -> str:
    return repr(raw[:40]) + ("..." if len(raw) > 40 else "")


def _check_key(key: str) -> None:
    if len(key.encode()) > MAX_KEY_BYTES:
        raise TextError(f"key longer than {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
    if not _KEY_RE.match(key):
        raise TextError(f"ill-formed key {key[:64]!r}")


def _check_value(key: str, value: str) -> None:
    limit = max_value_bytes(key)
    if "\x00" in value:
        raise TextError(f"NUL in the value of {key}")
    if len(value.encode()) > limit:
        raise TextError(f"value of {key} longer than {limit} bytes")


def parse_text(data: bytes) -> list[tuple[str, str]]:
    """Split text data into ``(key, value)`` pairs, in order (RFC 7143 §6.1).

    Every pair ends in NUL; a missing final NUL and trailing NUL padding are tolerated. Raises :class:`TextError` for a
    pair without ``=``, an empty pair, a key that is ill-formed or longer than 63 bytes, a value that is not UTF-8 or
    too long (255 bytes, 8192 for large-binary and vendor keys) and a key repeated where §6 forbids it.
    """
    body = bytes(data).rstrip(b"\x00")
    if not body:
        return []
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in body.split(b"\x00"):
        if not raw:
            raise TextError("empty key=value pair")
        raw_key, sep, raw_value = raw.partition(b"=")
        if not sep:
            raise TextError(f"no '=' in {_show(raw)}")
        if len(raw_key) > MAX_KEY_BYTES:
            raise TextError(f"key longer than {MAX_KEY_BYTES} bytes: {_show(raw_key)}")
        try:
            key = raw_key.decode("ascii")
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise TextError(f"pair is not UTF-8: {_show(raw)}") from None
        _check_key(key)
        _check_value(key, value)
        if key in seen and key not in REPEATABLE_KEYS:
            raise TextError(f"key {key} appears twice")
        seen.add(key)
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as ``key=value\\0`` each, checking the same rules :func:`parse_text` enforces."""
    out = bytearray()
    seen: set[str] = set()
    for key, value in pairs:
        _check_key(key)
        _check_value(key, value)
        if key in seen and key not in REPEATABLE_KEYS:
            raise TextError(f"key {key} appears twice")
        seen.add(key)
        out += f"{key}={value}".encode() + b"\x00"
    return bytes(out)


def parse_number(value: str) -> int | None:
    """A §6.1 numerical-value (decimal or 0x-hex, below 2**64), or None when ill-formed."""
    if _DECIMAL_RE.match(value):
        n = int(value, 10)
    elif _HEX_RE.match(value):
        n = int(value, 0)
    else:
        return None
    return n if n < 2**64 else None


# -- the key table (RFC 7143 §13) ---------------------------------------------------------------------------------------


class Kind(enum.Enum):
    """The value syntax of a key."""

    BOOLEAN = "Yes|No"
    NUMBER = "numerical-value"
    LIST = "list-of-values"
    TEXT = "text-value"


class Rule(enum.Enum):
    """How the result is computed from the two sides' values (§6.2)."""

    AND = "AND"  # Boolean, result Yes only if both say Yes
    OR = "OR"  # Boolean, result Yes if either says Yes
    MIN = "Minimum"
    MAX = "Maximum"
    LIST = "first acceptable value of the originator's list"
    DECLARATIVE = "declarative"  # each side states its own value; no answer
    REJECT = "obsolete, answered Reject"  # §13.25: IFMarkInt, OFMarkInt
    SESSION_LAYER = "answered by the session layer"  # SendTargets


class Scope(enum.Enum):
    SESSION = "SW"
    CONNECTION = "CO"


class Use(enum.Enum):
    """When a key may be sent (§13 "Use")."""

    LEADING_ONLY = "LO"  # login of the leading connection only
    LOGIN_ONLY = "IO"  # login of any connection
    ANY = "ALL"  # login and full feature phase
    FFP_ONLY = "FFPO"  # full feature phase only


class Sender(enum.Enum):
    INITIATOR = "I"
    TARGET = "T"
    BOTH = "I,T"


class Phase(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full feature"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One key of RFC 7143 §13 (or RFC 7144): its default, syntax, result rule, scope, use and bounds."""

    name: str
    default: str | None
    kind: Kind
    rule: Rule
    scope: Scope
    use: Use
    senders: Sender = Sender.BOTH
    bounds: tuple[int, int] | None = None
    values: tuple[str, ...] = ()  # admissible literals, for LIST keys and enumerated TEXT keys
    irrelevant_in_discovery: bool = False
    security: bool = False  # negotiated in the security stage (AuthMethod)


_LEN24 = (512, 2**24 - 1)
_S, _C = Scope.SESSION, Scope.CONNECTION
_LO, _IO, _ALL, _FFPO = Use.LEADING_ONLY, Use.LOGIN_ONLY, Use.ANY, Use.FFP_ONLY
_B, _N, _L, _T = Kind.BOOLEAN, Kind.NUMBER, Kind.LIST, Kind.TEXT

KEYS: Mapping[str, KeySpec] = {
    s.name: s
    for s in (
        KeySpec("HeaderDigest", "None", _L, Rule.LIST, _C, _IO, values=("CRC32C", "None")),  # §13.1
        KeySpec("DataDigest", "None", _L, Rule.LIST, _C, _IO, values=("CRC32C", "None")),  # §13.1
        KeySpec("MaxConnections", "1", _N, Rule.MIN, _S, _LO, bounds=(1, 65535),
                irrelevant_in_discovery=True),  # §13.2
        KeySpec("SendTargets", None, _T, Rule.SESSION_LAYER, _S, _FFPO, Sender.INITIATOR),  # §13.3
        KeySpec("TargetName", None, _T, Rule.DECLARATIVE, _S, _IO, Sender.INITIATOR),  # §13.4
        KeySpec("InitiatorName", None, _T, Rule.DECLARATIVE, _S, _IO, Sender.INITIATOR),  # §13.5
        KeySpec("TargetAlias", None, _T, Rule.DECLARATIVE, _S, _ALL, Sender.TARGET),  # §13.6
        KeySpec("InitiatorAlias", None, _T, Rule.DECLARATIVE, _S, _ALL, Sender.INITIATOR),  # §13.7
        KeySpec("TargetAddress", None, _T, Rule.DECLARATIVE, _S, _ALL, Sender.TARGET),  # §13.8
        KeySpec("TargetPortalGroupTag", None, _N, Rule.DECLARATIVE, _S, _IO, Sender.TARGET,
                bounds=(0, 65535)),  # §13.9
        KeySpec("InitialR2T", "Yes", _B, Rule.OR, _S, _LO, irrelevant_in_discovery=True),  # §13.10
        KeySpec("ImmediateData", "Yes", _B, Rule.AND, _S, _LO, irrelevant_in_discovery=True),  # §13.11
        KeySpec("MaxRecvDataSegmentLength", "8192", _N, Rule.DECLARATIVE, _C, _ALL, bounds=_LEN24),  # §13.12
        KeySpec("MaxBurstLength", "262144", _N, Rule.MIN, _S, _LO, bounds=_LEN24,
                irrelevant_in_discovery=True),  # §13.13
        KeySpec("FirstBurstLength", "65536", _N, Rule.MIN, _S, _LO, bounds=_LEN24,
                irrelevant_in_discovery=True),  # §13.14
        KeySpec("DefaultTime2Wait", "2", _N, Rule.MAX, _S, _LO, bounds=(0, 3600)),  # §13.15
        KeySpec("DefaultTime2Retain", "20", _N, Rule.MIN, _S, _LO, bounds=(0, 3600)),  # §13.16
        KeySpec("MaxOutstandingR2T", "1", _N, Rule.MIN, _S, _LO, bounds=(1, 65535),
                irrelevant_in_discovery=True),  # §13.17
        KeySpec("DataPDUInOrder", "Yes", _B, Rule.OR, _S, _LO, irrelevant_in_discovery=True),  # §13.18
        KeySpec("DataSequenceInOrder", "Yes", _B, Rule.OR, _S, _LO, irrelevant_in_discovery=True),  # §13.19
        KeySpec("ErrorRecoveryLevel", "0", _N, Rule.MIN, _S, _LO, bounds=(0, 2)),  # §13.20
        KeySpec("SessionType", "Normal", _T, Rule.DECLARATIVE, _S, _LO, Sender.INITIATOR,
                values=("Discovery", "Normal")),  # §13.21
        KeySpec("AuthMethod", "None", _L, Rule.LIST, _C, _IO,
                values=("KRB5", "SPKM1", "SPKM2", "SRP", "CHAP", "None"), security=True),  # §12.1
        KeySpec("TaskReporting", "RFC3720", _L, Rule.LIST, _S, _LO,
                values=("RFC3720", "ResponseFence", "FastAbort"), irrelevant_in_discovery=True),  # §13.23
        KeySpec("X#NodeArchitecture", None, _T, Rule.DECLARATIVE, _S, _LO),  # §13.26
        KeySpec("IFMarker", "No", _B, Rule.AND, _C, _IO),  # obsolete, §13.25
        KeySpec("OFMarker", "No", _B, Rule.AND, _C, _IO),  # obsolete, §13.25
        KeySpec("IFMarkInt", None, _T, Rule.REJECT, _C, _IO),  # obsolete, §13.25
        KeySpec("OFMarkInt", None, _T, Rule.REJECT, _C, _IO),  # obsolete, §13.25
        KeySpec("iSCSIProtocolLevel", "0", _N, Rule.MIN, _S, _LO, bounds=(0, 31)),  # RFC 7144 §2.1
    )
}

# Which Use values each phase admits; everything else is answered Reject.
ALLOWED_USE: Mapping[Phase, frozenset[Use]] = {
    Phase.LOGIN: frozenset({Use.LEADING_ONLY, Use.LOGIN_ONLY, Use.ANY}),
    Phase.FULL_FEATURE: frozenset({Use.ANY, Use.FFP_ONLY}),
}

# The target's own values: for MIN keys the most it accepts, for MAX keys the least, for Booleans its own value,
# for LIST keys the values it supports (in its order of preference when it has to offer), for
# MaxRecvDataSegmentLength what it declares, for SessionType the session types it admits.
DEFAULT_TARGET_LIMITS: Mapping[str, str] = {
    "HeaderDigest": "CRC32C,None",
    "DataDigest": "CRC32C,None",
    "AuthMethod": "None",
    "MaxConnections": "1",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": "262144",
    "MaxBurstLength": "1048576",
    "FirstBurstLength": "65536",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "20",
    "MaxOutstandingR2T": "1",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0",
    "SessionType": "Discovery,Normal",
    "TaskReporting": "RFC3720",
    "iSCSIProtocolLevel": "1",
}
# Not configurable: lunsync never does markers (§13.25).
_FIXED_TARGET_VALUES: Mapping[str, str] = {"IFMarker": "No", "OFMarker": "No"}


def _check_limit(spec: KeySpec, value: str) -> None:
    """Raise ValueError if ``value`` is not a well-formed target value for ``spec`` (configuration time)."""
    if spec.kind is Kind.BOOLEAN:
        ok = value in ("Yes", "No")
    elif spec.kind is Kind.NUMBER:
        n = parse_number(value)
        ok = n is not None and (spec.bounds is None or spec.bounds[0] <= n <= spec.bounds[1])
    else:  # LIST, and SessionType's set of admitted types
        items = value.split(",")
        ok = bool(value) and len(set(items)) == len(items) and all(v in spec.values for v in items)
    if not ok:
        raise ValueError(f"invalid target value {value!r} for {spec.name}")


# -- the result ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NegotiatedParams:
    """The outcome of a login's negotiation, typed. ``max_recv_data_segment_length`` is what the initiator declared it
    receives (so the most we may send in one PDU); ``target_max_recv_data_segment_length`` is what we declared."""

    session_type: str
    initiator_name: str | None
    initiator_alias: str | None
    target_name: str | None
    auth_method: str
    header_digest: bool
    data_digest: bool
    max_recv_data_segment_length: int
    target_max_recv_data_segment_length: int
    max_burst_length: int
    first_burst_length: int
    initial_r2t: bool
    immediate_data: bool
    max_outstanding_r2t: int
    data_pdu_in_order: bool
    data_sequence_in_order: bool
    error_recovery_level: int
    default_time2wait: int
    default_time2retain: int
    max_connections: int
    iscsi_protocol_level: int
    task_reporting: str

    @classmethod
    def defaults(cls) -> NegotiatedParams:
        """The RFC defaults: what holds for every key nobody negotiates."""
        values: dict[str, Any] = {f: None for f, _ in _FIELDS.values()}
        values.update({f: conv(_default(k)) for k, (f, conv) in _FIELDS.items() if KEYS[k].default is not None})
        values["target_max_recv_data_segment_length"] = values["max_recv_data_segment_length"]
        return cls(**values)


def _default(key: str) -> str:
    d = KEYS[key].default
    assert d is not None
    return d


def _yes(v: str) -> bool:
    return v == "Yes"


def _num(v: str) -> int:
    n = parse_number(v)
    assert n is not None
    return n


def _crc(v: str) -> bool:
    return v == "CRC32C"


def _text(v: str) -> str:
    return v


# Key -> (NegotiatedParams field, conversion of the negotiated string). MaxRecvDataSegmentLength here is the
# initiator's declaration; ours is recorded separately.
_FIELDS: Mapping[str, tuple[str, Callable[[str], Any]]] = {
    "HeaderDigest": ("header_digest", _crc),
    "DataDigest": ("data_digest", _crc),
    "AuthMethod": ("auth_method", _text),
    "MaxConnections": ("max_connections", _num),
    "InitialR2T": ("initial_r2t", _yes),
    "ImmediateData": ("immediate_data", _yes),
    "MaxRecvDataSegmentLength": ("max_recv_data_segment_length", _num),
    "MaxBurstLength": ("max_burst_length", _num),
    "FirstBurstLength": ("first_burst_length", _num),
    "DefaultTime2Wait": ("default_time2wait", _num),
    "DefaultTime2Retain": ("default_time2retain", _num),
    "MaxOutstandingR2T": ("max_outstanding_r2t", _num),
    "DataPDUInOrder": ("data_pdu_in_order", _yes),
    "DataSequenceInOrder": ("data_sequence_in_order", _yes),
    "ErrorRecoveryLevel": ("error_recovery_level", _num),
    "TaskReporting": ("task_reporting", _text),
    "iSCSIProtocolLevel": ("iscsi_protocol_level", _num),
    "SessionType": ("session_type", _text),
    "InitiatorName": ("initiator_name", _text),
    "InitiatorAlias": ("initiator_alias", _text),
    "TargetName": ("target_name", _text),
}

# Processing order inside one text: SessionType decides relevance of the rest, and FirstBurstLength depends on
# MaxBurstLength, InitialR2T and ImmediateData.
_PRIORITY: Mapping[str, int] = {"SessionType": 0, "FirstBurstLength": 2}

# -- the negotiator -----------------------------------------------------------------------------------------------------


class Negotiator:
    """Answers one initiator's offers for one login (or one full-feature text negotiation) of one connection.

    ``target_limits`` overrides :data:`DEFAULT_TARGET_LIMITS` (unknown keys are a ValueError). ``session_type`` is the
    type the login machine read from the first request; a ``SessionType`` key passed to :meth:`respond` must agree.
    ``leading`` is False for a connection joining an existing session, and ``baseline`` is then that session's
    result; in ``Phase.FULL_FEATURE`` ``baseline`` is this connection's current result.

    Call :meth:`respond` once per complete request text; before granting the move to full feature phase, send
    :meth:`offers` (if not empty, hold the transit until :attr:`awaiting_answers` is False) and then
    :meth:`declarations`. :meth:`result` gives the outcome at any point.
    """

    def __init__(
        self,
        target_limits: Mapping[str, str] | None = None,
        *,
        session_type: str = "Normal",
        leading: bool = True,
        phase: Phase = Phase.LOGIN,
        baseline: NegotiatedParams | None = None,
    ) -> None:
        limits = dict(DEFAULT_TARGET_LIMITS)
        for key, value in (target_limits or {}).items():
            if key not in DEFAULT_TARGET_LIMITS:
                raise ValueError(f"unknown target limit {key!r}")
            _check_limit(KEYS[key], value)
            limits[key] = value
        limits.update(_FIXED_TARGET_VALUES)
        if session_type not in KEYS["SessionType"].values:
            raise NegotiationError(f"unknown session type {session_type[:40]!r}")
        if session_type not in limits["SessionType"].split(","):
            raise NegotiationError(f"{session_type} sessions not admitted", 0x02, _SESSION_TYPE_NOT_SUPPORTED)
        if (not leading or phase is Phase.FULL_FEATURE) and baseline is None:
            raise ValueError("a non-leading connection or a full-feature negotiation needs the baseline parameters")
        fbl, mbl = int(limits["FirstBurstLength"]), int(limits["MaxBurstLength"])
        if fbl > mbl:
            raise ValueError("FirstBurstLength limit exceeds MaxBurstLength limit")
        self._limits = limits
        self._leading = leading
        self._phase = phase
        self._session_type = session_type
        if baseline is None:
            start = NegotiatedParams.defaults()
        elif phase is Phase.LOGIN:
            # A new connection starts with the connection-scope defaults and the session's session-wide values.
            d = NegotiatedParams.defaults()
            conn = {f: getattr(d, f) for k, (f, _) in _FIELDS.items() if KEYS[k].scope is Scope.CONNECTION}
            start = dataclasses.replace(baseline, target_max_recv_data_segment_length=8192, **conn)
        else:
            start = baseline
        self._start = dataclasses.replace(start, session_type=session_type)
        self._values: dict[str, str] = {}  # negotiated results, by key
        self._seen: set[str] = set()  # keys the initiator sent, for §6 duplicate detection
        self._offered: dict[str, str] = {}  # our offers awaiting the initiator's answer
        self._declared_mrdsl: int | None = None
        self._calls = 0

    # -- public -------------------------------------------------------------------------------------------------------

    @property
    def awaiting_answers(self) -> bool:
        """True while the initiator still owes answers to :meth:`offers`."""
        return bool(self._offered)

    def respond(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Apply §6.2 to the initiator's pairs and return the target's answers, in the order of the offers.

        Raises :class:`NegotiationError` for a protocol error, including an authentication key (:func:`is_auth_key`).
        """
        items = list(pairs)
        order = sorted(range(len(items)), key=lambda i: _PRIORITY.get(items[i][0], 1))
        answers: dict[int, tuple[str, str]] = {}
        for i in order:
            key, value = items[i]
            answer = self._one(key, value)
            if answer is not None:
                answers[i] = (key, answer)
        self._calls += 1
        return [answers[i] for i in sorted(answers)] + self._first_burst_offer()

    def declarations(self) -> list[tuple[str, str]]:
        """The target's own declarations not yet sent: its MaxRecvDataSegmentLength (§13.12), login phase only."""
        if self._phase is not Phase.LOGIN or self._declared_mrdsl is not None:
            return []
        self._declared_mrdsl = int(self._limits["MaxRecvDataSegmentLength"])
        return [("MaxRecvDataSegmentLength", str(self._declared_mrdsl))]

    def offers(self) -> list[tuple[str, str]]:
        """Target-initiated offers for keys nobody negotiated whose RFC default the target cannot accept.

        Booleans the target's value decides (ImmediateData=No) are recorded at once, since §6.2.2 requires no answer;
        numbers and lists await the initiator's answer (:attr:`awaiting_answers`).
        """
        if self._phase is not Phase.LOGIN:
            return []
        out: list[tuple[str, str]] = []
        for key, spec in KEYS.items():
            if key in self._seen or key in self._offered or key in self._values or key not in self._limits:
                continue
            if spec.security or spec.rule in (Rule.DECLARATIVE, Rule.REJECT, Rule.SESSION_LAYER):
                continue
            if self._skipped(spec) or self._irrelevant(spec):
                continue
            ours, default = self._limits[key], _default(key)
            if spec.rule is Rule.AND and ours == "No" and default == "Yes":
                self._values[key] = "No"
                out.append((key, "No"))
            elif spec.rule is Rule.OR and ours == "Yes" and default == "No":
                self._values[key] = "Yes"
                out.append((key, "Yes"))
            elif spec.rule is Rule.LIST and default not in ours.split(","):
                self._offered[key] = ours
                out.append((key, ours))
            elif (spec.rule is Rule.MIN and _num(default) > self._target_number(key)) or (
                spec.rule is Rule.MAX and _num(default) < self._target_number(key)
            ):
                self._offered[key] = str(self._target_number(key))
                out.append((key, self._offered[key]))
        return out

    def _first_burst_offer(self) -> list[tuple[str, str]]:
        """§13.14: FirstBurstLength MUST NOT exceed MaxBurstLength. When the initiator lowers MaxBurstLength below a
        FirstBurstLength nobody negotiated, the target offers a FirstBurstLength that fits."""
        spec = KEYS["FirstBurstLength"]
        key = spec.name
        if key in self._seen or key in self._offered or key in self._values or self._phase is not Phase.LOGIN:
            return []
        if self._skipped(spec) or self._irrelevant(spec):
            return []
        ours = self._target_number(key)
        if _num(self._current(key)) <= ours:
            return []
        self._offered[key] = str(ours)
        return [(key, str(ours))]

    def _target_number(self, key: str) -> int:
        """The target's own number for a MIN/MAX key; FirstBurstLength is also held under MaxBurstLength."""
        n = _num(self._limits[key])
        if key == "FirstBurstLength":
            n = min(n, _num(self._current("MaxBurstLength")))
        return n

    def result(self) -> NegotiatedParams:
        """The negotiated parameters so far, over the RFC defaults (or the baseline)."""
        changes: dict[str, Any] = {}
        for key, value in self._values.items():
            fld = _FIELDS.get(key)
            if fld is not None:
                changes[fld[0]] = fld[1](value)
        if self._declared_mrdsl is not None:
            changes["target_max_recv_data_segment_length"] = self._declared_mrdsl
        r = dataclasses.replace(self._start, **changes)
        if r.first_burst_length > r.max_burst_length:
            # Reached only when FirstBurstLength was irrelevant, rejected, or our offer is still unanswered: §13.14
            # caps it at MaxBurstLength whatever was said.
            r = dataclasses.replace(r, first_burst_length=r.max_burst_length)
        return r

    # -- one key ------------------------------------------------------------------------------------------------------

    def _one(self, key: str, value: str) -> str | None:
        if is_auth_key(key):
            # The login machine hands CHAP_* to chap.py; any other method's key here was never asked for.
            raise NegotiationError(f"authentication key {key} outside an authentication exchange")
        if key in self._offered:
            self._seen.add(key)
            self._take_answer(KEYS[key], self._offered.pop(key), value)
            return None
        if key in self._seen:
            raise NegotiationError(f"{key} negotiated twice in one login")
        self._seen.add(key)
        spec = KEYS.get(key)
        if spec is None:
            return NOT_UNDERSTOOD
        if value in RESERVED_ANSWERS:
            raise NegotiationError(f"{key} offered the reserved value {value}")
        if spec.senders is Sender.TARGET:
            raise NegotiationError(f"{key} may only be sent by a target")
        if spec.use not in ALLOWED_USE[self._phase]:
            return REJECT
        if spec.rule is Rule.SESSION_LAYER:
            return None
        if self._skipped(spec):
            return IRRELEVANT
        if spec.name == "SessionType":
            return self._session_type_key(value)
        if self._irrelevant(spec):
            return IRRELEVANT
        return _RULES[spec.rule](self, spec, value)

    def _skipped(self, spec: KeySpec) -> bool:
        # The session already holds leading-only values when this connection is not the leading one.
        return spec.use is Use.LEADING_ONLY and not self._leading

    def _irrelevant(self, spec: KeySpec) -> bool:
        if spec.irrelevant_in_discovery and self._session_type == "Discovery":
            return True
        if spec.name == "FirstBurstLength":  # §13.14
            return self._current("InitialR2T") == "Yes" and self._current("ImmediateData") == "No"
        return False

    def _current(self, key: str) -> str:
        if key in self._values:
            return self._values[key]
        fld, _ = _FIELDS[key]
        v = getattr(self._start, fld)
        if isinstance(v, bool):
            return "Yes" if v else "No"
        return str(v)

    def _session_type_key(self, value: str) -> str | None:
        if self._calls:
            # Earlier answers assumed the constructor's type; §13.21 wants it in the first request.
            raise NegotiationError("SessionType after the first login request")
        if value not in KEYS["SessionType"].values:
            raise NegotiationError(f"unknown session type {value[:40]!r}")
        if value != self._session_type:
            raise NegotiationError("SessionType disagrees with the login's session type")
        self._values["SessionType"] = value
        return None

    def _take_answer(self, spec: KeySpec, ours: str, value: str) -> None:
        """Check the initiator's answer to one of our offers (§6.2: a non-admissible answer is a protocol error)."""
        ok = False
        if spec.rule is Rule.LIST:
            ok = value in ours.split(",")
        elif spec.rule in (Rule.MIN, Rule.MAX):
            n, mine = parse_number(value), _num(ours)
            lo, hi = spec.bounds or (0, 2**64 - 1)
            ok = n is not None and lo <= n <= hi and (n <= mine if spec.rule is Rule.MIN else n >= mine)
        if not ok:
            raise NegotiationError(f"inadmissible answer {value[:40]!r} to our {spec.name}={ours}")
        self._values[spec.name] = value if spec.kind is not Kind.NUMBER else str(_num(value))

    # -- the rules (§6.2) ---------------------------------------------------------------------------------------------

    def _list(self, spec: KeySpec, value: str) -> str:
        offered = value.split(",")
        if not all(offered):
            return REJECT
        ours = self._limits.get(spec.name, _default(spec.name)).split(",")
        for v in offered:  # §6.2.1: the first of the originator's values the acceptor supports
            if v in ours:
                self._values[spec.name] = v
                return v
        return REJECT

    def _boolean(self, spec: KeySpec, value: str) -> str:
        if value not in ("Yes", "No"):
            return REJECT
        ours = self._limits[spec.name] == "Yes"
        theirs = value == "Yes"
        res = "Yes" if ((theirs and ours) if spec.rule is Rule.AND else (theirs or ours)) else "No"
        self._values[spec.name] = res
        return res

    def _numeric(self, spec: KeySpec, value: str) -> str:
        n = parse_number(value)
        assert spec.bounds is not None
        if n is None or not spec.bounds[0] <= n <= spec.bounds[1]:
            return REJECT
        ours = self._target_number(spec.name)  # FirstBurstLength: never above MaxBurstLength (§13.14)
        res = min(n, ours) if spec.rule is Rule.MIN else max(n, ours)
        if spec.name == "MaxBurstLength" and res < _num(self._values.get("FirstBurstLength", "0")):
            raise NegotiationError("MaxBurstLength below the FirstBurstLength already agreed")
        self._values[spec.name] = str(res)
        return str(res)

    def _declarative(self, spec: KeySpec, value: str) -> str | None:
        if spec.kind is Kind.NUMBER:
            n = parse_number(value)
            assert spec.bounds is not None
            if n is None or not spec.bounds[0] <= n <= spec.bounds[1]:
                return REJECT
            self._values[spec.name] = str(n)
            if spec.name == "MaxRecvDataSegmentLength":
                mine = self.declarations()  # declare ours alongside theirs, once
                return mine[0][1] if mine else None
            return None
        names = ("InitiatorName", "TargetName")
        if spec.name in names and (not value or len(value.encode()) > MAX_NAME_BYTES):
            raise NegotiationError(f"ill-formed {spec.name}")
        if spec.name != "X#NodeArchitecture":  # understood, but lunsync has no use for it
            self._values[spec.name] = value
        return None

    def _reject(self, spec: KeySpec, value: str) -> str:
        return REJECT


_RULES: Mapping[Rule, Callable[[Negotiator, KeySpec, str], str | None]] = {
    Rule.LIST: Negotiator._list,
    Rule.AND: Negotiator._boolean,
    Rule.OR: Negotiator._boolean,
    Rule.MIN: Negotiator._numeric,
    Rule.MAX: Negotiator._numeric,
    Rule.DECLARATIVE: Negotiator._declarative,
    Rule.REJECT: Negotiator._reject,
}

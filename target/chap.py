"""CHAP authentication for iSCSI login (RFC 7143 §12.1.3 over RFC 1994), target side, with mutual CHAP.

This module owns the CHAP exchange of the security negotiation stage: the algorithm choice by IANA number (5 MD5,
6 SHA-1, 7 SHA-256, 8 SHA3-256, from the IANA PPP Authentication Algorithms registry of §12.1.3), the
challenge, the constant-time check of the initiator's response, the refusal of reflected challenges, and the target's
own response when the initiator asks for mutual authentication. It also owns the §6.1 binary-value encodings
(``0x`` hex, ``0b`` base64) CHAP_C and CHAP_R travel in. :class:`ChapServer` is a sans-I/O state machine fed the
``CHAP_*`` pairs of each Login Request; randomness is injected so tests are deterministic. Every failure raises
:class:`AuthError`, whose reason is safe to log (it never holds a secret) and which the login machine answers with
status 0x0201.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lunsync.target.keys import parse_number

# -- errors -------------------------------------------------------------------------------------------------------------


class AuthError(Exception):
    """Authentication failed: login status class 0x02, detail 0x01 (RFC 7143 §11.13.5). ``kind`` is one of
    :data:`FAILURE_KINDS`, a bounded label for the metrics; ``reason`` is the free text for the log."""

    status_class = 0x02
    status_detail = 0x01

    def __init__(self, reason: str, kind: str = "protocol") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


# Why CHAP exchanges fail, as metric labels: a wrong user name, a wrong response (a wrong secret), the initiator
# reflecting the target's own challenge, or anything else that breaks the exchange.
FAILURE_KINDS: tuple[str, ...] = ("unknown_user", "wrong_response", "reflection", "protocol")


@dataclass(slots=True)
class ChapCounters:
    """Failed CHAP exchanges by kind, for the whole process; :mod:`lunsync.provider.metrics` reads them."""

    failures: collections.Counter[str] = field(default_factory=collections.Counter)


COUNTERS = ChapCounters()


# -- algorithms ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChapAlgorithm:
    """One CHAP hash: its IANA number, hashlib name and digest size in bytes."""

    number: int
    hash_name: str
    digest_size: int


ALGORITHMS: Mapping[int, ChapAlgorithm] = {
    a.number: a
    for a in (
        ChapAlgorithm(5, "md5", 16),
        ChapAlgorithm(6, "sha1", 20),
        ChapAlgorithm(7, "sha256", 32),
        ChapAlgorithm(8, "sha3_256", 32),
    )
}
# MD5 stays enabled by default: the Microsoft initiator and libiscsi offer nothing else.
DEFAULT_ALGORITHMS: tuple[int, ...] = (5, 6, 7, 8)

# RFC 7143 §6.1: a large-binary-value is at most 1024 bytes before encoding.
MAX_CHALLENGE_BYTES = 1024
# RFC 7143 §12.1.3 asks for secrets of at least 96 bits; shorter ones are accepted, and flagged by `weak`.
RECOMMENDED_SECRET_BYTES = 12


def chap_response(alg: int, ident: int, secret: bytes, challenge: bytes) -> bytes:
    """The CHAP response H(identifier || secret || challenge) of RFC 1994 §4.1 with hash number ``alg``."""
    a = ALGORITHMS.get(alg)
    if a is None:
        raise ValueError(f"unsupported CHAP algorithm {alg}")
    if not 0 <= ident <= 255:
        raise ValueError(f"CHAP identifier {ident} is not one octet")
    h = hashlib.new(a.hash_name)
    h.update(bytes((ident,)))
    h.update(secret)
    h.update(challenge)
    return h.digest()


# -- binary values (RFC 7143 §6.1) --------------------------------------------------------------------------------------

_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+\Z")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}\Z")


def decode_binary(text: str) -> bytes:
    """Decode a binary-value: ``0x``/``0X`` then hex digits, or ``0b``/``0B`` then base64. ValueError otherwise."""
    prefix, body = text[:2], text[2:]
    if prefix in ("0x", "0X"):
        if not _HEX_DIGITS.match(body):
            raise ValueError("ill-formed hex binary value")
        if len(body) % 2:
            body = "0" + body  # an odd digit count reads as a number, with an implied leading zero
        return bytes.fromhex(body)
    if prefix in ("0b", "0B"):
        if not _BASE64.match(body) or len(body) % 4:
            raise ValueError("ill-formed base64 binary value")
        try:
            return base64.b64decode(body, validate=True)
        except binascii.Error:
            raise ValueError("ill-formed base64 binary value") from None
    raise ValueError("binary value is neither 0x-hex nor 0b-base64")


def encode_binary(data: bytes) -> str:
    """Encode bytes as a hex binary-value, the form every initiator reads."""
    return "0x" + data.hex()


# -- credentials --------------------------------------------------------------------------------------------------------


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """The target's CHAP configuration. The initiator proves ``user``/``secret``; if it asks, the target proves
    ``mutual_user``/``mutual_secret``. Text secrets are used as their UTF-8 bytes."""

    user: str
    secret: str | bytes = field(repr=False)
    mutual_user: str | None = None
    mutual_secret: str | bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.user or not self.secret:
            raise ValueError("CHAP user and secret must not be empty")
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise ValueError("mutual CHAP needs both a user and a secret")
        if self.mutual_user is not None and not (self.mutual_user and self.mutual_secret):
            raise ValueError("mutual CHAP user and secret must not be empty")
        if self.mutual_secret is not None and _as_bytes(self.mutual_secret) == _as_bytes(self.secret):
            # RFC 7143 §12.1.3: a secret used to authenticate initiators MUST NOT authenticate a target.
            raise ValueError("the mutual CHAP secret must differ from the initiator's secret")

    @property
    def has_mutual(self) -> bool:
        return self.mutual_secret is not None

    @property
    def weak(self) -> bool:
        """True if a secret is shorter than the 96 bits RFC 7143 §12.1.3 asks for."""
        lengths = [len(_as_bytes(self.secret))]
        if self.mutual_secret is not None:
            lengths.append(len(_as_bytes(self.mutual_secret)))
        return min(lengths) < RECOMMENDED_SECRET_BYTES


# -- the state machine --------------------------------------------------------------------------------------------------


class ChapState(enum.Enum):
    AWAIT_ALGORITHMS = "awaiting CHAP_A"
    AWAIT_RESPONSE = "awaiting CHAP_N and CHAP_R"
    DONE = "authenticated"
    FAILED = "failed"


# The keys each state accepts: (required, optional). A state missing here accepts nothing.
_EXPECTED: Mapping[ChapState, tuple[frozenset[str], frozenset[str]]] = {
    ChapState.AWAIT_ALGORITHMS: (frozenset({"CHAP_A"}), frozenset()),
    ChapState.AWAIT_RESPONSE: (frozenset({"CHAP_N", "CHAP_R"}), frozenset({"CHAP_I", "CHAP_C"})),
}


def _short(value: str) -> str:
    return repr(value[:64]) + ("..." if len(value) > 64 else "")


class ChapServer:
    """Target-side CHAP for one connection's login. Feed it each request's ``CHAP_*`` pairs with :meth:`step`."""

    def __init__(
        self,
        credentials: ChapCredentials,
        *,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        algorithms: Sequence[int] = DEFAULT_ALGORITHMS,
    ) -> None:
        unknown = [a for a in algorithms if a not in ALGORITHMS]
        if unknown or not algorithms:
            raise ValueError(f"unsupported CHAP algorithms {unknown or 'none'}")
        self.credentials = credentials
        self._random_bytes = random_bytes
        self._algorithms = frozenset(algorithms)
        self.state = ChapState.AWAIT_ALGORITHMS
        self.algorithm: ChapAlgorithm | None = None
        self._ident = 0
        self._challenge = b""
        self.mutual = False  # True once the target has answered the initiator's challenge

    @property
    def done(self) -> bool:
        return self.state is ChapState.DONE

    def step(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Consume one request's CHAP pairs; return the CHAP pairs to answer with. Raises AuthError on failure."""
        try:
            received = self._check_keys(list(pairs))
            if self.state is ChapState.AWAIT_ALGORITHMS:
                return self._choose(received["CHAP_A"])
            return self._verify(received)
        except AuthError as e:
            self.state = ChapState.FAILED
            COUNTERS.failures[e.kind] += 1
            raise

    def _check_keys(self, pairs: list[tuple[str, str]]) -> dict[str, str]:
        expected = _EXPECTED.get(self.state)
        if expected is None:
            raise AuthError(f"CHAP keys received after the exchange {self.state.value}")
        required, optional = expected
        received: dict[str, str] = {}
        for k, v in pairs:
            if k in received:
                raise AuthError(f"{k} sent twice")
            received[k] = v
        names = set(received)
        if not required <= names or not names <= required | optional:
            raise AuthError(f"unexpected CHAP keys {sorted(names)} while {self.state.value}")
        return received

    def _choose(self, offered: str) -> list[tuple[str, str]]:
        # §12.1.3 / §6.2.1: the first of the initiator's algorithms we support; values we do not know are ignored.
        for item in offered.split(","):
            n = parse_number(item)
            if n is not None and n in self._algorithms:
                alg = ALGORITHMS[n]
                break
        else:
            raise AuthError(f"no CHAP algorithm in common with CHAP_A={_short(offered)}")
        self.algorithm = alg
        self._ident = self._random_bytes(1)[0]
        self._challenge = self._random_bytes(alg.digest_size)
        self.state = ChapState.AWAIT_RESPONSE
        return [("CHAP_A", str(alg.number)), ("CHAP_I", str(self._ident)), ("CHAP_C", encode_binary(self._challenge))]

    def _verify(self, received: dict[str, str]) -> list[tuple[str, str]]:
        alg = self.algorithm
        assert alg is not None
        creds = self.credentials
        # Parse the mutual challenge first so that a malformed one fails before we compute anything.
        mutual = self._mutual_challenge(received)
        try:
            response = decode_binary(received["CHAP_R"])
        except ValueError as e:
            raise AuthError(f"CHAP_R: {e}") from None
        expected = chap_response(alg.number, self._ident, _as_bytes(creds.secret), self._challenge)
        # Both comparisons always run, in constant time, so timing tells neither which part was wrong.
        user_ok = hmac.compare_digest(received["CHAP_N"].encode(), creds.user.encode())
        response_ok = hmac.compare_digest(response, expected)
        if not user_ok:
            raise AuthError(f"CHAP_N {_short(received['CHAP_N'])} is not the configured user", "unknown_user")
        if not response_ok:
            raise AuthError(f"CHAP_R does not match for user {_short(creds.user)}", "wrong_response")
        self.state = ChapState.DONE
        if mutual is None:
            return []
        ident, challenge = mutual
        assert creds.mutual_user is not None and creds.mutual_secret is not None
        self.mutual = True
        answer = chap_response(alg.number, ident, _as_bytes(creds.mutual_secret), challenge)
        return [("CHAP_N", creds.mutual_user), ("CHAP_R", encode_binary(answer))]

    def _mutual_challenge(self, received: dict[str, str]) -> tuple[int, bytes] | None:
        if "CHAP_I" not in received and "CHAP_C" not in received:
            return None
        if "CHAP_I" not in received or "CHAP_C" not in received:
            raise AuthError("mutual CHAP needs both CHAP_I and CHAP_C")
        if not self.credentials.has_mutual:
            raise AuthError("initiator asked the target to authenticate, but no mutual CHAP secret is configured")
        ident = parse_number(received["CHAP_I"])
        if ident is None or ident > 255:
            raise AuthError(f"CHAP_I {_short(received['CHAP_I'])} is not one octet")
        try:
            challenge = decode_binary(received["CHAP_C"])
        except ValueError as e:
            raise AuthError(f"CHAP_C: {e}") from None
        if not 1 <= len(challenge) <= MAX_CHALLENGE_BYTES:
            raise AuthError(f"CHAP_C of {len(challenge)} bytes")
        if hmac.compare_digest(challenge, self._challenge):
            # RFC 7143 §12.1.3: answering our own challenge would let an attacker reflect it back to us.
            raise AuthError("initiator reflected the target's challenge", "reflection")
        return ident, challenge

"""The login state machine (RFC 7143 §6): stages, text continuation, security and operational negotiation.

One :class:`LoginMachine` lives for one connection's login phase. It is fed decoded Login Requests with their data
segments and returns :class:`LoginReply` values; it does no I/O and never reads the clock. Failures raise
:class:`~lunsync.target.errors.LoginError`, which the connection turns into a Login Response with that status.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from lunsync.target import chap as chap_mod
from lunsync.target import keys
from lunsync.target.directory import Directory, TargetEntry
from lunsync.target.errors import LoginError, LoginStatus
from lunsync.target.pdu import LoginRequest

# iSCSI version 0x00 is RFC 7143's (and RFC 3720's) only version.
VERSION = 0x00
MAX_LOGIN_TEXT = 64 * 1024


class Stage(enum.IntEnum):
    """Login stages, as CSG/NSG encode them (RFC 7143 §11.12.3)."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


@dataclass(slots=True)
class LoginReply:
    """One Login Response to send: flags, status and text pairs. ``done`` means full feature phase begins."""

    transit: bool
    csg: int
    nsg: int
    pairs: list[tuple[str, str]] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True, slots=True)
class LoginResult:
    """What a completed login hands to the session layer."""

    initiator_name: str
    initiator_alias: str
    isid: int
    tsih: int
    cid: int
    discovery: bool
    target: TargetEntry | None
    params: keys.NegotiatedParams
    auth: str


class LoginMachine:
    """Runs one connection's login. The clock and randomness are injected; the directory is read, not changed."""

    def __init__(
        self,
        directory: Directory,
        *,
        tpgt: int = 1,
        target_limits: dict[str, str] | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.directory = directory
        self.tpgt = tpgt
        self.target_limits = dict(target_limits or {})
        self.random_bytes = random_bytes
        self.stage: Stage | None = None
        self.first: LoginRequest | None = None
        self.initiator_name = ""
        self.initiator_alias = ""
        self.discovery = False
        self.target: TargetEntry | None = None
        self.negotiator: keys.Negotiator | None = None
        self.chap: chap_mod.ChapServer | None = None
        self.auth_method: str | None = None
        self.authenticated = False
        self.pending_text = bytearray()
        self.sent_tpgt = False
        self.sent_declarations = False
        self.auth_label = "none"

    # -- the one entry point ------------------------------------------------------------------------------------------

    def handle(self, req: LoginRequest, data: bytes) -> LoginReply:
        """Process one Login Request. Returns the reply, or raises LoginError."""
        if self.first is None:
            self._check_first(req)
        else:
            self._check_next(req)
        if req.cont:
            if req.transit:
                raise LoginError(LoginStatus.INITIATOR_ERROR, "login request with both C and T bits set")
            self.pending_text += data
            if len(self.pending_text) > MAX_LOGIN_TEXT:
                raise LoginError(LoginStatus.INITIATOR_ERROR, "login text too long")
            # RFC 7143 §6.1: acknowledge a partial text with an empty response.
            return LoginReply(False, req.csg, req.csg)
        text = bytes(self.pending_text) + data
        self.pending_text.clear()
        try:
            pairs = keys.parse_text(text)
        except keys.TextError as e:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"malformed login text: {e}") from None
        if self.stage is None:
            self._start(req, pairs)
        return self._stage_step(req, pairs)

    # -- checks -------------------------------------------------------------------------------------------------------

    def _check_first(self, req: LoginRequest) -> None:
        if req.version_min > VERSION:
            raise LoginError(LoginStatus.UNSUPPORTED_VERSION, f"unsupported version min {req.version_min}")
        if req.csg not in (Stage.SECURITY, Stage.OPERATIONAL):
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"invalid current stage {req.csg}")
        self.first = req

    def _check_next(self, req: LoginRequest) -> None:
        first = self.first
        assert first is not None
        if req.isid != first.isid or req.tsih != first.tsih or req.cid != first.cid:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "ISID, TSIH or CID changed during login")
        if self.stage is not None and req.csg != self.stage:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"stage {req.csg} out of sequence (expected {self.stage})")

    def _start(self, req: LoginRequest, pairs: list[tuple[str, str]]) -> None:
        d = dict(pairs)
        name = d.get("InitiatorName")
        if not name:
            raise LoginError(LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
        self.initiator_name = name
        self.initiator_alias = d.get("InitiatorAlias", "")
        session_type = d.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise LoginError(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"session type {session_type!r}")
        self.discovery = session_type == "Discovery"
        if not self.discovery:
            tname = d.get("TargetName")
            if not tname:
                raise LoginError(LoginStatus.MISSING_PARAMETER, "TargetName missing")
            target = self.directory.lookup(tname)
            if target is None:
                raise LoginError(LoginStatus.NOT_FOUND, f"target {tname} not found")
            if not target.allows(name):
                raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, f"initiator not in the ACL of {target.name}")
            self.target = target
        if req.tsih != 0:
            # lunsync runs one connection per session (MaxConnections=1): no connection can join an existing one.
            raise LoginError(LoginStatus.SESSION_DOES_NOT_EXIST, f"TSIH {req.tsih} does not name a session to join")
        self.negotiator = keys.Negotiator(self.target_limits, session_type=session_type, leading=True)
        self.stage = Stage(req.csg)
        if self.stage == Stage.OPERATIONAL and self._chap_required():
            raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required but security negotiation skipped")

    def _chap_required(self) -> bool:
        return self.target is not None and self.target.chap is not None

    # -- stages -------------------------------------------------------------------------------------------------------

    def _stage_step(self, req: LoginRequest, pairs: list[tuple[str, str]]) -> LoginReply:
        assert self.negotiator is not None
        out: list[tuple[str, str]] = []
        op_pairs: list[tuple[str, str]] = []
        for k, v in pairs:
            if k in ("InitiatorName", "TargetName", "SessionType", "InitiatorAlias"):
                continue
            if k == "AuthMethod" or k.startswith("CHAP_"):
                if self.stage != Stage.SECURITY:
                    raise LoginError(LoginStatus.INITIATOR_ERROR, f"{k} outside security negotiation")
                continue
            op_pairs.append((k, v))
        if self.stage == Stage.SECURITY:
            out += self._security(pairs)
        try:
            out += self.negotiator.respond(op_pairs)
        except keys.NegotiationError as e:
            raise LoginError(LoginStatus(e.status_class << 8 | e.status_detail), str(e)) from None
        if not self.discovery and not self.sent_tpgt:
            out.append(("TargetPortalGroupTag", str(self.tpgt)))
            if self.target is not None and self.target.alias:
                out.append(("TargetAlias", self.target.alias))
            self.sent_tpgt = True
        transit = False
        nsg = req.csg
        if req.transit:
            if req.nsg not in (Stage.OPERATIONAL, Stage.FULL_FEATURE) or req.nsg <= req.csg:
                raise LoginError(LoginStatus.INITIATOR_ERROR, f"invalid transition {req.csg}->{req.nsg}")
            if self._may_leave_security():
                transit, nsg = True, req.nsg
        if transit and nsg == Stage.FULL_FEATURE:
            # Before granting full feature phase, offer what the RFC defaults would get wrong for us, and hold the
            # stage until the initiator has answered (RFC 7143 §6.2).
            offers = self.negotiator.offers()
            if offers or self.negotiator.awaiting_answers:
                out += offers
                transit, nsg = False, req.csg
            elif not self.sent_declarations:
                out += self.negotiator.declarations()
                self.sent_declarations = True
        reply = LoginReply(transit, req.csg, nsg, out)
        if transit:
            self.stage = Stage(nsg)
            reply.done = nsg == Stage.FULL_FEATURE
        return reply

    def _may_leave_security(self) -> bool:
        if self.stage != Stage.SECURITY:
            return True
        if self._chap_required():
            if not self.authenticated:
                if self.auth_method is None or self.auth_method == "None":
                    raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required")
                return False  # exchange still under way; the target holds the stage
            return True
        return True

    def _security(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        chap_in = [(k, v) for k, v in pairs if k.startswith("CHAP_")]
        for k, v in pairs:
            if k != "AuthMethod":
                continue
            offered = [m.strip() for m in v.split(",")]
            if self._chap_required():
                if "CHAP" not in offered:
                    raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, "initiator does not offer CHAP")
                choice = "CHAP"
            else:
                # No credentials are configured for this target (or it is discovery): only None can be agreed.
                choice = "None" if "None" in offered else "Reject"
            self.auth_method = choice
            out.append(("AuthMethod", choice))
            if choice == "None":
                self.authenticated = True
        if chap_in:
            if self.auth_method != "CHAP" or self.target is None or self.target.chap is None:
                raise LoginError(LoginStatus.INITIATOR_ERROR, "CHAP keys without AuthMethod=CHAP")
            if self.chap is None:
                c = self.target.chap
                self.chap = chap_mod.ChapServer(
                    chap_mod.ChapCredentials(c.user, c.secret, c.mutual_user, c.mutual_secret),
                    random_bytes=self.random_bytes,
                )
            try:
                out += self.chap.step(chap_in)
            except chap_mod.AuthError as e:
                raise LoginError(LoginStatus.AUTHENTICATION_FAILURE, str(e)) from None
            if self.chap.done:
                self.authenticated = True
                self.auth_label = "chap-mutual" if self.chap.mutual else "chap"
        return out

    def result(self, tsih: int) -> LoginResult:
        assert self.first is not None and self.negotiator is not None
        return LoginResult(
            initiator_name=self.initiator_name,
            initiator_alias=self.initiator_alias,
            isid=self.first.isid,
            tsih=tsih,
            cid=self.first.cid,
            discovery=self.discovery,
            target=self.target,
            params=self.negotiator.result(),
            auth=self.auth_label,
        )

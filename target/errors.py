"""The iSCSI error family: each error knows the wire answer it becomes, and only the connection turns it into one.

:class:`ProtocolError` becomes a Reject PDU (or, when ``fatal``, closing the connection). :class:`LoginError`
becomes a Login Response with its status class and detail, after which the connection closes. SCSI-level errors
(CHECK CONDITION) are the other family and live in :mod:`lunsync.target.scsi.sense`.
"""

from __future__ import annotations

import enum

from lunsync.target.pdu import RejectReason


class LoginStatus(enum.IntEnum):
    """Login status class << 8 | detail (RFC 7143 §11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class ProtocolError(Exception):
    """The initiator broke RFC 7143 in full feature phase. Answered with Reject, or the connection closes."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.PROTOCOL_ERROR, *, fatal: bool = False,
                 data_sn: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal
        self.data_sn = data_sn


class LoginError(Exception):
    """The login cannot go on. ``reason`` is for the log line and the metrics label; it never holds a secret."""

    def __init__(self, status: LoginStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    @property
    def status_class(self) -> int:
        return int(self.status) >> 8

    @property
    def status_detail(self) -> int:
        return int(self.status) & 0xFF

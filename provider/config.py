"""The one typed configuration model: the TOML file users write, parsed into frozen dataclasses, and written back.

This module owns the file format read by ``lunsync serve --config FILE`` and ``lunsync apply FILE`` and written by
``lunsync export``; the catalog (:mod:`lunsync.snapshots.catalog`) owns the runtime state and reconciles itself to a
:class:`Config`. Every value is validated here, once: a :class:`Config` that exists is a valid one, whether it came
from a file, from the catalog or from the API. It also owns the size syntax (:func:`parse_size`, :func:`format_size`)
that the CLI shares. The format::

    [portal]                                   # optional; every key has a default
    listen = ["127.0.0.1:3260", "[::1]:3260"]  # HOST:PORT, IPv4 or [IPv6] literal; default ["127.0.0.1:3260"]
    nop_interval_s = 30                        # NOP-In keepalive interval; 0 = off
    nop_timeout_s = 15                         # drop the connection when a NOP-In goes unanswered this long
    login_timeout_s = 15                       # a login must reach full feature phase within this
    max_sessions = 256

    [[lun]]                                    # one table per LUN
    name = "db0"                               # [A-Za-z0-9][A-Za-z0-9._-]{0,63}, no ".."; unique
    path = "luns/db0.img"                      # optional; relative to the data dir (no ".."); default
                                               #   luns/<name>.img; an absolute /dev/... path is a block device
    size = "10GiB"                             # required; integer bytes or "<number><unit>", see parse_size();
                                               #   a multiple of block_size
    block_size = 512                           # 512 or 4096
    thin = true                                # false = preallocated (thick)
    read_only = false
    chunk_size = "64KiB"                       # copy-on-write chunk for snapshots: power of two, 4KiB..1MiB
    naa = "60a5c51bd1b44b91a412d638c08ea6aa"   # optional, written by export: the NAA-6 designator (VPD 0x83),
                                               #   32 hex digits; fixed once the LUN exists
    serial = "XUNUJOI2IEWWHDAI5JVK"            # optional, written by export: the unit serial number (VPD 0x80);
                                               #   derived from naa when only naa is given

    [[target]]
    iqn = "iqn.2026-11.io.lunsync:demo"        # iqn./eui./naa. name (RFC 3720 §3.2.6.3), compared in lowercase
    alias = "demo"                             # optional TargetAlias
    acl = ["iqn.1994-05.com.redhat:client1"]   # initiator names allowed to log in; empty or absent = any
    luns = [{ lun = 0, name = "db0" }]         # LUN number (0..16383) -> LUN name; a LUN may appear in several
                                               #   targets (multipath, clusters) but only once per target
    [target.chap]                              # optional; enables CHAP on the target declared just above
    user = "alice"
    secret = "0123456789ab"                    # 1..255 bytes; a warning below 12 (RFC 7143 §9.2.1) or above 16
                                               #   (the Microsoft initiator's limit)
    mutual_user = "target1"                    # optional mutual CHAP: both or neither
    mutual_secret = "ba9876543210"             # must differ from secret

Sizes are binary: K = KiB = 1024, M = MiB, G = GiB, T = TiB, P = PiB, case-insensitive, decimals allowed when the
result is whole bytes ("1.5GiB"); KB/MB/GB are refused as ambiguous. Unknown keys, at any level, are errors naming
the key and its line: a misspelt ``read_onyl`` must not silently
leave a LUN writable.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import ipaddress
import os
import re
import tempfile
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn, TypeVar

__all__ = [
    "DEFAULT_LISTEN",
    "MAX_LUN_NUMBER",
    "ChapConfig",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "LunConfig",
    "LunMapping",
    "PortalConfig",
    "TargetConfig",
    "config_warnings",
    "default_lun_path",
    "dump_config",
    "format_size",
    "load_config",
    "normalize_iscsi_name",
    "parse_config",
    "parse_listen",
    "parse_size",
    "save_config",
]

KeyPath = tuple[str | int, ...]
T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:3260"
# The flat LUN address space of SAM-5 §4.7.7 (14 bits): what every initiator can address without hierarchical LUNs.
MAX_LUN_NUMBER = 16383
MAX_SIZE_BYTES = (1 << 63) - 1  # READ CAPACITY(16) and SQLite INTEGER are both 64-bit
CHUNK_MIN_BYTES = 4 << 10
CHUNK_MAX_BYTES = 1 << 20
ISCSI_NAME_MAX_BYTES = 223  # RFC 3720 §3.2.6.1
CHAP_SECRET_MAX_BYTES = 255
CHAP_SECRET_MIN_ADVISED = 12  # 96 bits, RFC 7143 §9.2.1
CHAP_SECRET_MAX_WINDOWS = 16  # the Microsoft iSCSI Initiator refuses longer secrets


class ConfigError(ValueError):
    """An invalid configuration. ``path`` is the key path (``("lun", 0, "size")``), ``line`` its line in the file
    when it came from one; ``str()`` renders ``FILE:LINE: lun[0].size: message``."""

    def __init__(
        self, message: str, *, path: KeyPath = (), line: int | None = None, source: str | None = None
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.source = source
        super().__init__(self._render())

    @property
    def key(self) -> str:
        """The key path in dotted form, e.g. ``target[0].chap.user``."""
        return _path_str(self.path)

    def _render(self) -> str:
        where = ""
        if self.source is not None and self.line is not None:
            where = f"{self.source}:{self.line}: "
        elif self.line is not None:
            where = f"line {self.line}: "
        elif self.source is not None:
            where = f"{self.source}: "
        key = f"{self.key}: " if self.path else ""
        return f"{where}{key}{self.message}"

    def located(self, source: str | None, line: int | None) -> ConfigError:
        """The same error, placed in a file."""
        return ConfigError(self.message, path=self.path, line=line, source=source)


class ConfigWarning(UserWarning):
    """A legal but unwise setting (a short CHAP secret). Emitted by :func:`parse_config`."""


def _path_str(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --- sizes -----------------------------------------------------------------------------------------------------------

# K/M/G/T/P and KiB/MiB/... are all binary: block storage is sized in powers of two, and "10G" meaning 10**10 would
# give a LUN that is not a whole number of 1 MiB chunks. KB/MB/GB are refused rather than guessed.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "p": 1 << 50,
    "pib": 1 << 50,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_FORMAT_UNITS = (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def parse_size(value: str | int) -> int:
    """Parse a size in bytes: an integer, or a string such as ``"4096"``, ``"512M"``, ``"256MiB"``, ``"10GiB"``,
    ``"1.5TiB"`` or ``"1TiB"``. Units are case-insensitive and binary (K = KiB = 1024). Raises ``ValueError``
    (``TypeError`` for a value that is neither ``int`` nor ``str``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"a size must be an integer number of bytes or a string like '10GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise ValueError(
            f"invalid size {value!r}: expected bytes or a number with a unit, e.g. '4096', '512MiB', '10GiB', '1TiB'"
        )
    unit = m[2].lower()
    if unit in ("kb", "mb", "gb", "tb", "pb"):
        raise ValueError(
            f"ambiguous unit {m[2]!r} in {value!r}: write {m[2][0].upper()}iB (1024-based) or the size in bytes"
        )
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown unit {m[2]!r} in {value!r}: use B, KiB, MiB, GiB, TiB or PiB (or K, M, G, T, P)")
    try:
        n = Decimal(m[1]) * _SIZE_UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
        raise ValueError(f"invalid size {value!r}") from None
    if n != n.to_integral_value():
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(n)


def format_size(n: int) -> str:
    """Render ``n`` bytes exactly, in the largest binary unit that divides it: ``"10GiB"``, ``"1536B"``.
    ``parse_size(format_size(n)) == n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"not a size in bytes: {n!r}")
    for suffix, unit in _FORMAT_UNITS:
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}B"


# --- field validators: each takes a raw value and returns the normalized one, or raises ValueError -----------------


def _as_str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string, not {_type_name(v)}")
    return v


def _as_bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"must be true or false, not {_type_name(v)}")
    return v


def _as_int(v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"must be an integer, not {_type_name(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"must be between {lo} and {hi}, not {v}")
    return v


def _type_name(v: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table", tuple: "an array"}
    return names.get(type(v), type(v).__name__)


_LUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _lun_name(v: object) -> str:
    s = _as_str(v)
    if not _LUN_NAME_RE.fullmatch(s) or ".." in s:
        raise ValueError(
            f"invalid LUN name {s!r}: 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, "
            "without '..'"
        )
    return s


def default_lun_path(name: str) -> str:
    """Where a LUN's backing file lives, relative to the data dir, when the configuration does not say."""
    return f"luns/{name}.img"


def _lun_path(v: object) -> str:
    s = _as_str(v)
    if not s or "\0" in s:
        raise ValueError("must be a non-empty path")
    if not os.path.isabs(s) and ".." in s.replace("\\", "/").split("/"):
        # A relative path is inside the data dir by contract; '..' would let a config file reach anywhere.
        raise ValueError(f"a relative path may not contain '..': {s!r} (use an absolute path)")
    norm = os.path.normpath(s)
    if norm in (".", "/"):
        raise ValueError(f"not a file path: {s!r}")
    return norm


def _block_size(v: object) -> int:
    if isinstance(v, bool) or v not in (512, 4096):
        raise ValueError(f"must be 512 or 4096, not {v!r}")
    assert isinstance(v, int)
    return v


def _size(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise TypeError(f"must be bytes or a string like '10GiB', not {_type_name(v)}")
    n = parse_size(v)
    if n <= 0:
        raise ValueError("must be greater than zero")
    if n > MAX_SIZE_BYTES:
        raise ValueError(f"{n} bytes is larger than the 64-bit maximum")
    return n


def _chunk_size(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise TypeError(f"must be bytes or a string like '64KiB', not {_type_name(v)}")
    n = parse_size(v)
    if n & (n - 1) or not CHUNK_MIN_BYTES <= n <= CHUNK_MAX_BYTES:
        raise ValueError(f"must be a power of two from 4KiB to 1MiB, not {format_size(n)}")
    return n


def _naa(v: object) -> str:
    s = _as_str(v).lower()
    if not re.fullmatch(r"6[0-9a-f]{31}", s):
        raise ValueError(f"must be an NAA IEEE Registered Extended designator (32 hex digits, starting 6), not {s!r}")
    return s


def _serial(v: object) -> str:
    s = _as_str(v)
    # VPD 0x80 carries ASCII (SPC-4 §4.4.1); spaces are padding there, so none inside.
    if not re.fullmatch(r"[\x21-\x7e]{1,64}", s):
        raise ValueError(f"must be 1-64 printable ASCII characters without spaces, not {s!r}")
    return s


_IQN_RE = re.compile(
    r"iqn\.(\d{4})-(\d{2})\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[a-z0-9.:_-]+)?"
)


def normalize_iscsi_name(name: str) -> str:
    """Validate an iSCSI name (RFC 3720 §3.2.6.3: ``iqn.YYYY-MM.reversed.domain[:suffix]``, ``eui.`` + 16 hex
    digits, ``naa.`` + 16 or 32 hex digits) and return it in the lowercase form in which names are compared
    (RFC 3722). The login layer must compare initiator names through this too. Raises ``ValueError``
    (``TypeError`` for a non-string)."""
    if not isinstance(name, str):
        raise TypeError(f"an iSCSI name must be a string, not {_type_name(name)}")
    s = name.strip().lower()
    if len(s.encode()) > ISCSI_NAME_MAX_BYTES:
        raise ValueError(f"iSCSI name longer than {ISCSI_NAME_MAX_BYTES} bytes: {name!r}")
    if s.startswith("iqn."):
        m = _IQN_RE.fullmatch(s)
        if m is None or not 1 <= int(m[2]) <= 12:
            raise ValueError(
                f"invalid iqn name {name!r}: expected iqn.YYYY-MM.reversed.domain[:identifier], "
                "e.g. iqn.2026-11.io.lunsync:demo"
            )
        return s
    if s.startswith("eui."):
        if not re.fullmatch(r"eui\.[0-9a-f]{16}", s):
            raise ValueError(f"invalid eui name {name!r}: expected eui. followed by 16 hex digits")
        return s
    if s.startswith("naa."):
        if not re.fullmatch(r"naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})", s):
            raise ValueError(f"invalid naa name {name!r}: expected naa. followed by 16 or 32 hex digits")
        return s
    raise ValueError(f"invalid iSCSI name {name!r}: must start with iqn., eui. or naa.")


def _iscsi_name(v: object) -> str:
    return normalize_iscsi_name(_as_str(v))


def _alias(v: object) -> str:
    s = _as_str(v)
    if not s.isprintable() or len(s.encode()) > 255:
        raise ValueError("must be printable text of at most 255 bytes")
    return s


def _lun_number(v: object) -> int:
    return _as_int(v, 0, MAX_LUN_NUMBER)


def _chap_user(v: object) -> str:
    s = _as_str(v)
    if not s or not s.isprintable() or len(s.encode()) > 255:
        raise ValueError("must be 1-255 bytes of printable text")
    return s


def _chap_secret(v: object) -> str:
    s = _as_str(v)
    if not s or not s.isprintable() or len(s.encode()) > CHAP_SECRET_MAX_BYTES:
        raise ValueError(f"must be 1-{CHAP_SECRET_MAX_BYTES} bytes of printable text")
    return s


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv4 literal or bracketed IPv6 literal) into ``(host, port)``. Raises ``ValueError``
    (``TypeError`` for a non-string)."""
    if not isinstance(text, str):
        raise TypeError(f"a listen address must be a string, not {_type_name(text)}")
    host: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid listen address {text!r}: expected [IPV6]:PORT")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {text!r}") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"invalid listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:3260")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            hint = " (put IPv6 addresses in brackets: [::1]:3260)" if ":" in host else " (use an IP address)"
            raise ValueError(f"invalid IPv4 address in {text!r}{hint}") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid port in {text!r}: expected 1-65535")
    return str(ip), int(port)


def _listen(v: object) -> str:
    host, port = parse_listen(_as_str(v))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_list(v: object) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"must be an array of HOST:PORT strings, not {_type_name(v)}")
    if not v:
        raise ValueError("needs at least one address")
    out = tuple(_listen(x) for x in v)
    seen: dict[tuple[int, int], str] = {}
    for i, addr in enumerate(out):
        host, port = parse_listen(addr)
        ip = ipaddress.ip_address(host)
        if addr in out[:i]:
            raise ValueError(f"{addr} is listed twice")
        # A wildcard and a specific address of one family on one port cannot both be bound (EADDRINUSE).
        key = (ip.version, port)
        if key in seen and (ip.is_unspecified or ipaddress.ip_address(parse_listen(seen[key])[0]).is_unspecified):
            raise ValueError(f"{addr} overlaps {seen[key]}: both cannot be bound")
        seen.setdefault(key, addr)
    return out


def _freeze(obj: object, name: str, check: Callable[[object], T], ctx: KeyPath) -> T:
    """Validate and normalize one field of a frozen dataclass in ``__post_init__``."""
    try:
        value = check(getattr(obj, name))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), path=(*ctx, name)) from None
    object.__setattr__(obj, name, value)
    return value


def _tuple_of(check: Callable[[object], T]) -> Callable[[object], tuple[T, ...]]:
    def conv(v: object) -> tuple[T, ...]:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"must be an array, not {_type_name(v)}")
        return tuple(check(x) for x in v)

    return conv


# --- the model -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortalConfig:
    """The iSCSI portal group: where the daemon listens, and its session timers."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    nop_interval_s: int = 30
    nop_timeout_s: int = 15
    login_timeout_s: int = 15
    max_sessions: int = 256

    def __post_init__(self) -> None:
        ctx: KeyPath = ("portal",)
        _freeze(self, "listen", _listen_list, ctx)
        _freeze(self, "nop_interval_s", lambda v: _as_int(v, 0, 3600), ctx)
        _freeze(self, "nop_timeout_s", lambda v: _as_int(v, 1, 3600), ctx)
        _freeze(self, "login_timeout_s", lambda v: _as_int(v, 1, 3600), ctx)
        _freeze(self, "max_sessions", lambda v: _as_int(v, 1, 65535), ctx)

    def addresses(self) -> tuple[tuple[str, int], ...]:
        """The listen addresses as ``(host, port)`` pairs, ready for ``loop.create_server``."""
        return tuple(parse_listen(a) for a in self.listen)


@dataclass(frozen=True, slots=True)
class LunConfig:
    """One logical unit and its backing store. ``path`` is relative to the data dir unless absolute; an empty
    ``path`` means :func:`default_lun_path`. ``naa``/``serial`` pin the identity (export writes them); absent, the
    catalog generates one when it creates the LUN."""

    name: str
    size_bytes: int
    path: str = ""
    block_size: int = 512
    thin: bool = True
    read_only: bool = False
    chunk_size_bytes: int = 64 << 10
    naa: str | None = None
    serial: str | None = None

    def __post_init__(self) -> None:
        name = _freeze(self, "name", _lun_name, ("lun",))
        ctx: KeyPath = (f"lun[{name!r}]",)
        if self.path == "":
            object.__setattr__(self, "path", default_lun_path(name))
        _freeze(self, "path", _lun_path, ctx)
        _freeze(self, "size_bytes", _size, ctx)
        _freeze(self, "block_size", _block_size, ctx)
        _freeze(self, "thin", _as_bool, ctx)
        _freeze(self, "read_only", _as_bool, ctx)
        _freeze(self, "chunk_size_bytes", _chunk_size, ctx)
        if self.naa is not None:
            _freeze(self, "naa", _naa, ctx)
        if self.serial is not None:
            _freeze(self, "serial", _serial, ctx)
        if self.size_bytes % self.block_size:
            raise ConfigError(
                f"{self.size_bytes} bytes is not a multiple of the {self.block_size}-byte block size",
                path=(*ctx, "size_bytes"),
            )

    @property
    def num_blocks(self) -> int:
        return self.size_bytes // self.block_size


@dataclass(frozen=True, slots=True)
class LunMapping:
    """LUN number ``lun`` of a target shows the LUN called ``name``."""

    lun: int
    name: str

    def __post_init__(self) -> None:
        _freeze(self, "lun", _lun_number, ("luns",))
        _freeze(self, "name", _lun_name, ("luns",))


@dataclass(frozen=True, slots=True, repr=False)
class ChapConfig:
    """CHAP credentials of a target: the initiator proves ``user``/``secret``; with mutual CHAP the target proves
    ``mutual_user``/``mutual_secret`` back. Secrets never appear in ``repr``."""

    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None

    def __post_init__(self) -> None:
        ctx: KeyPath = ("chap",)
        _freeze(self, "user", _chap_user, ctx)
        _freeze(self, "secret", _chap_secret, ctx)
        if (self.mutual_user is None) != (self.mutual_secret is None):
            missing = "mutual_secret" if self.mutual_secret is None else "mutual_user"
            raise ConfigError("mutual CHAP needs both mutual_user and mutual_secret", path=(*ctx, missing))
        if self.mutual_user is not None:
            _freeze(self, "mutual_user", _chap_user, ctx)
            _freeze(self, "mutual_secret", _chap_secret, ctx)
            if self.mutual_secret == self.secret:
                # One secret both ways lets an attacker reflect the target's own challenge back at it.
                raise ConfigError("mutual_secret must differ from secret", path=(*ctx, "mutual_secret"))

    @property
    def mutual(self) -> bool:
        return self.mutual_user is not None

    def __repr__(self) -> str:
        mutual = f", mutual_user={self.mutual_user!r}, mutual_secret='***'" if self.mutual else ""
        return f"ChapConfig(user={self.user!r}, secret='***'{mutual})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One iSCSI target. ``acl`` empty means any initiator may log in. ``acl`` and ``luns`` are kept sorted, so two
    targets that mean the same thing compare equal."""

    iqn: str
    alias: str = ""
    acl: tuple[str, ...] = ()
    luns: tuple[LunMapping, ...] = ()
    chap: ChapConfig | None = None

    def __post_init__(self) -> None:
        iqn = _freeze(self, "iqn", _iscsi_name, ("target",))
        ctx: KeyPath = (f"target[{iqn!r}]",)
        _freeze(self, "alias", _alias, ctx)
        acl = _freeze(self, "acl", _tuple_of(_iscsi_name), ctx)
        for i, name in enumerate(acl):
            if name in acl[:i]:
                raise ConfigError(f"initiator {name} is listed twice", path=(*ctx, "acl", i))
        object.__setattr__(self, "acl", tuple(sorted(acl)))
        maps = self.luns
        if not isinstance(maps, (list, tuple)) or not all(isinstance(m, LunMapping) for m in maps):
            raise ConfigError("must be a sequence of LunMapping", path=(*ctx, "luns"))
        _check_mappings(maps, (*ctx, "luns"))
        object.__setattr__(self, "luns", tuple(sorted(maps, key=lambda m: m.lun)))
        if self.chap is not None and not isinstance(self.chap, ChapConfig):
            raise ConfigError("must be a ChapConfig", path=(*ctx, "chap"))

    def lun_names(self) -> dict[int, str]:
        return {m.lun: m.name for m in self.luns}


def _check_mappings(maps: Sequence[LunMapping], ctx: KeyPath) -> None:
    numbers: dict[int, int] = {}
    names: dict[str, int] = {}
    for i, m in enumerate(maps):
        if m.lun in numbers:
            raise ConfigError(f"LUN number {m.lun} is mapped twice", path=(*ctx, i, "lun"))
        if m.name in names:
            # Two LUN numbers on one I_T nexus with the same identity would look like two paths to one disk.
            raise ConfigError(f"LUN {m.name!r} is mapped twice in one target", path=(*ctx, i, "name"))
        numbers[m.lun] = i
        names[m.name] = i


@dataclass(frozen=True, slots=True)
class Config:
    """A whole configuration: the portal, the LUNs and the targets that show them. Cross-checked on construction."""

    portal: PortalConfig = field(default_factory=PortalConfig)
    luns: tuple[LunConfig, ...] = ()
    targets: tuple[TargetConfig, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "luns", tuple(self.luns))
        object.__setattr__(self, "targets", tuple(self.targets))
        by_name: dict[str, int] = {}
        by_path: dict[str, int] = {}
        by_naa: dict[str, int] = {}
        by_serial: dict[str, int] = {}
        for i, lun in enumerate(self.luns):
            for index, key, what, value in (
                (by_name, "name", "LUN name", lun.name),
                (by_path, "path", "path", lun.path),
                (by_naa, "naa", "naa", lun.naa),
                (by_serial, "serial", "serial", lun.serial),
            ):
                if value is None:
                    continue
                if value in index:
                    other = self.luns[index[value]].name
                    raise ConfigError(f"{what} {value!r} is already used by LUN {other!r}", path=("lun", i, key))
                index[value] = i
        iqns: dict[str, int] = {}
        for t, target in enumerate(self.targets):
            if target.iqn in iqns:
                raise ConfigError(f"target {target.iqn} is declared twice", path=("target", t, "iqn"))
            iqns[target.iqn] = t
            for m, mapping in enumerate(target.luns):
                if mapping.name not in by_name:
                    raise ConfigError(
                        f"LUN {mapping.lun} maps to unknown LUN {mapping.name!r}",
                        path=("target", t, "luns", m, "name"),
                    )

    def lun(self, name: str) -> LunConfig:
        for lun in self.luns:
            if lun.name == name:
                return lun
        raise KeyError(name)


def config_warnings(cfg: Config) -> list[str]:
    """Advice about legal but unwise settings, for the daemon to log (the parser emits it as :class:`ConfigWarning`)."""
    return [f"{_path_str(path)}: {msg}" for path, msg in _warnings(cfg)]


def _warnings(cfg: Config) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    for t, target in enumerate(cfg.targets):
        if target.chap is None:
            continue
        for key, secret in (("secret", target.chap.secret), ("mutual_secret", target.chap.mutual_secret)):
            if secret is None:
                continue
            n = len(secret.encode())
            if n < CHAP_SECRET_MIN_ADVISED:
                out.append((("target", t, "chap", key), f"CHAP secret of {n} bytes is weak; use at least 12"))
            elif n > CHAP_SECRET_MAX_WINDOWS:
                out.append(
                    (("target", t, "chap", key), f"CHAP secret of {n} bytes: the Microsoft initiator accepts 12-16")
                )
    return out


# --- locating keys in the source text --------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class _KeyLines:
    """The line of every key and table in a TOML document, by key path (array elements by index).

    tomllib reports no positions, so this walks the text once more. The text has already parsed, so the walk can
    trust the grammar; it is best effort all the same: if it gets lost, keys simply have no line.
    """

    def __init__(self, text: str) -> None:
        self._s = text
        self._i = 0
        self._newlines = [m.start() for m in re.finditer("\n", text)]
        self._aot: dict[KeyPath, int] = {}
        self.lines: dict[KeyPath, int] = {}
        try:
            self._document()
        except (IndexError, ValueError, AttributeError):
            pass

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its nearest enclosing key or table."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def _line(self) -> int:
        return bisect.bisect_left(self._newlines, self._i) + 1

    def _document(self) -> None:
        table: KeyPath = ()
        s = self._s
        while True:
            self._skip_blank()
            if self._i >= len(s):
                return
            if s[self._i] == "[":
                line = self._line()
                aot = s.startswith("[[", self._i)
                self._i += 2 if aot else 1
                keys = self._key()
                self._skip_ws()
                self._expect("]]" if aot else "]")
                table = self._resolve(keys, aot, line)
            else:
                self._keyval(table)

    def _resolve(self, keys: list[str], aot: bool, line: int) -> KeyPath:
        path: KeyPath = ()
        for n, key in enumerate(keys):
            path = (*path, key)
            if aot and n == len(keys) - 1:
                index = self._aot.get(path, 0)
                self._aot[path] = index + 1
                self.lines.setdefault(path, line)
                path = (*path, index)
            elif path in self._aot:
                path = (*path, self._aot[path] - 1)
            self.lines.setdefault(path, line)
        return path

    def _keyval(self, prefix: KeyPath) -> None:
        line = self._line()
        path = prefix
        for key in self._key():
            path = (*path, key)
            self.lines.setdefault(path, line)
        self._skip_ws()
        self._expect("=")
        self._value(path)

    def _key(self) -> list[str]:
        parts: list[str] = []
        s = self._s
        while True:
            self._skip_ws()
            if s[self._i] in "\"'":
                start = self._i
                self._string()
                # Let tomllib decode the quoted key, escapes and all, rather than reimplementing them.
                parts.append(next(iter(tomllib.loads(s[start : self._i] + " = 0"))))
            else:
                m = _BARE_KEY.match(s, self._i)
                if m is None:
                    raise ValueError("lost")
                parts.append(m.group())
                self._i = m.end()
            self._skip_ws()
            if self._i < len(s) and s[self._i] == ".":
                self._i += 1
                continue
            return parts

    def _value(self, path: KeyPath) -> None:
        self._skip_ws()
        s = self._s
        c = s[self._i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._i += 1
            index = 0
            while True:
                self._skip_blank()
                if s[self._i] == "]":
                    self._i += 1
                    return
                self.lines.setdefault((*path, index), self._line())
                self._value((*path, index))
                index += 1
                self._skip_blank()
                if s[self._i] == ",":
                    self._i += 1
        elif c == "{":
            self._i += 1
            while True:
                self._skip_blank()
                if s[self._i] == "}":
                    self._i += 1
                    return
                self._keyval(path)
                self._skip_blank()
                if s[self._i] == ",":
                    self._i += 1
        else:
            while self._i < len(s) and s[self._i] not in ",]}\r\n#":
                self._i += 1

    def _string(self) -> None:
        s = self._s
        q = s[self._i]
        if s.startswith(q * 3, self._i):
            self._i += 3
            while True:
                if q == '"' and s[self._i] == "\\":
                    self._i += 2
                elif s.startswith(q * 3, self._i):
                    # Up to two quotes may precede the closing delimiter; the whole run belongs to this string.
                    while self._i < len(s) and s[self._i] == q:
                        self._i += 1
                    return
                else:
                    self._i += 1
        self._i += 1
        while s[self._i] != q:
            self._i += 2 if q == '"' and s[self._i] == "\\" else 1
        self._i += 1

    def _skip_ws(self) -> None:
        while self._i < len(self._s) and self._s[self._i] in " \t":
            self._i += 1

    def _skip_blank(self) -> None:
        s = self._s
        while self._i < len(s):
            c = s[self._i]
            if c in " \t\r\n":
                self._i += 1
            elif c == "#":
                end = s.find("\n", self._i)
                self._i = len(s) if end < 0 else end
            else:
                return

    def _expect(self, token: str) -> None:
        if not self._s.startswith(token, self._i):
            raise ValueError("lost")
        self._i += len(token)


# --- parsing ---------------------------------------------------------------------------------------------------------

_PORTAL_KEYS = ("listen", "nop_interval_s", "nop_timeout_s", "login_timeout_s", "max_sessions")
_LUN_KEYS = ("name", "path", "size", "block_size", "thin", "read_only", "chunk_size", "naa", "serial")
_TARGET_KEYS = ("iqn", "alias", "acl", "luns", "chap")
_MAPPING_KEYS = ("lun", "name")
_CHAP_KEYS = ("user", "secret", "mutual_user", "mutual_secret")
_TOP_KEYS = ("portal", "lun", "target")


class _Parser:
    """Turns the dict tomllib produced into a :class:`Config`, naming the line of anything wrong."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.where = _KeyLines(text)

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        raise ConfigError(message, path=path, line=self.where.line_of(path), source=self.source)

    def table(self, value: object, path: KeyPath, known: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be a table, not {_type_name(value)}")
        for key in value:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                also = f"; did you mean {hint[0]!r}?" if hint else f"; expected one of: {', '.join(known)}"
                self.fail((*path, key), f"unknown key {key!r}{also}")
        for key in required:
            if key not in value:
                self.fail(path, f"missing required key {key!r}")
        return value

    def array(self, value: object, path: KeyPath) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"must be an array, not {_type_name(value)}")
        return value

    def get(self, table: Mapping[str, Any], path: KeyPath, key: str, check: Callable[[object], T]) -> T:
        return self.item(table[key], (*path, key), check)

    def item(self, value: object, path: KeyPath, check: Callable[[object], T]) -> T:
        try:
            return check(value)
        except (TypeError, ValueError) as e:
            self.fail(path, str(e))

    def built(self, path: KeyPath, make: Callable[[], T]) -> T:
        """Construct a dataclass; its own checks should never fire after ours, but if one does, place it."""
        try:
            return make()
        except ConfigError as e:
            self.fail(path, e.message)

    def config(self, raw: dict[str, Any]) -> Config:
        self.table(raw, (), _TOP_KEYS)
        portal = self.portal(raw.get("portal", {}))
        luns = tuple(self.lun(v, ("lun", i)) for i, v in enumerate(self.array(raw.get("lun", []), ("lun",))))
        targets = tuple(
            self.target(v, ("target", i)) for i, v in enumerate(self.array(raw.get("target", []), ("target",)))
        )
        try:
            return Config(portal=portal, luns=luns, targets=targets)
        except ConfigError as e:
            raise e.located(self.source, self.where.line_of(e.path)) from None

    def portal(self, value: object) -> PortalConfig:
        path: KeyPath = ("portal",)
        t = self.table(value, path, _PORTAL_KEYS)
        kw: dict[str, Any] = {}
        if "listen" in t:
            kw["listen"] = self.get(t, path, "listen", _listen_list)
        for key, lo in (("nop_interval_s", 0), ("nop_timeout_s", 1), ("login_timeout_s", 1)):
            if key in t:
                kw[key] = self.get(t, path, key, functools.partial(_as_int, lo=lo, hi=3600))
        if "max_sessions" in t:
            kw["max_sessions"] = self.get(t, path, "max_sessions", lambda v: _as_int(v, 1, 65535))
        return self.built(path, lambda: PortalConfig(**kw))

    def lun(self, value: object, path: KeyPath) -> LunConfig:
        t = self.table(value, path, _LUN_KEYS, required=("name", "size"))
        kw: dict[str, Any] = {
            "name": self.get(t, path, "name", _lun_name),
            "size_bytes": self.get(t, path, "size", _size),
        }
        for key, attr, check in (
            ("path", "path", _lun_path),
            ("block_size", "block_size", _block_size),
            ("thin", "thin", _as_bool),
            ("read_only", "read_only", _as_bool),
            ("chunk_size", "chunk_size_bytes", _chunk_size),
            ("naa", "naa", _naa),
            ("serial", "serial", _serial),
        ):
            if key in t:
                kw[attr] = self.get(t, path, key, check)
        block = kw.get("block_size", 512)
        if kw["size_bytes"] % block:
            self.fail(
                (*path, "size"),
                f"{format_size(kw['size_bytes'])} is not a multiple of the {block}-byte block size",
            )
        return self.built(path, lambda: LunConfig(**kw))

    def target(self, value: object, path: KeyPath) -> TargetConfig:
        t = self.table(value, path, _TARGET_KEYS, required=("iqn",))
        kw: dict[str, Any] = {"iqn": self.get(t, path, "iqn", _iscsi_name)}
        if "alias" in t:
            kw["alias"] = self.get(t, path, "alias", _alias)
        if "acl" in t:
            acl = self.array(t["acl"], (*path, "acl"))
            names = [self.item(v, (*path, "acl", i), _iscsi_name) for i, v in enumerate(acl)]
            for i, name in enumerate(names):
                if name in names[:i]:
                    self.fail((*path, "acl", i), f"initiator {name} is listed twice")
            kw["acl"] = tuple(names)
        if "luns" in t:
            maps: list[LunMapping] = []
            for i, m in enumerate(self.array(t["luns"], (*path, "luns"))):
                mpath = (*path, "luns", i)
                mt = self.table(m, mpath, _MAPPING_KEYS, required=_MAPPING_KEYS)
                maps.append(LunMapping(self.get(mt, mpath, "lun", _lun_number), self.get(mt, mpath, "name", _lun_name)))
            try:
                _check_mappings(maps, (*path, "luns"))
            except ConfigError as e:
                self.fail(e.path, e.message)
            kw["luns"] = tuple(maps)
        if "chap" in t:
            kw["chap"] = self.chap(t["chap"], (*path, "chap"))
        return self.built(path, lambda: TargetConfig(**kw))

    def chap(self, value: object, path: KeyPath) -> ChapConfig:
        t = self.table(value, path, _CHAP_KEYS, required=("user", "secret"))
        kw = {key: self.get(t, path, key, _chap_user if "user" in key else _chap_secret) for key in t}
        if ("mutual_user" in kw) != ("mutual_secret" in kw):
            self.fail(path, "mutual CHAP needs both mutual_user and mutual_secret")
        if "mutual_secret" in kw and kw["mutual_secret"] == kw["secret"]:
            self.fail((*path, "mutual_secret"), "mutual_secret must differ from secret")
        return self.built(path, lambda: ChapConfig(**kw))


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Parse the TOML text of a configuration. Raises :class:`ConfigError` naming the file, line and key; warns
    (:class:`ConfigWarning`) about legal but unwise settings."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ConfigError(f"invalid TOML: {e}", line=int(m[1]) if m else None, source=source) from None
    parser = _Parser(source, text)
    cfg = parser.config(raw)
    for path, msg in _warnings(cfg):
        line = parser.where.line_of(path)
        warnings.warn(ConfigWarning(f"{source}:{line}: {_path_str(path)}: {msg}"), stacklevel=2)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a configuration file."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", source=name) from None
    return parse_config(text, source=name)


# --- writing ---------------------------------------------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _q(s: str) -> str:
    """A TOML basic string."""
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _size_value(n: int) -> str:
    text = format_size(n)
    return str(n) if text.endswith("B") and not text.endswith("iB") else _q(text)


def _str_array(items: Iterable[str]) -> str:
    return "[" + ", ".join(_q(x) for x in items) + "]"


def _bool(b: bool) -> str:
    return "true" if b else "false"


def dump_config(cfg: Config) -> str:
    """Write ``cfg`` in the format :func:`parse_config` reads; ``parse_config(dump_config(c)) == c``. The text holds
    CHAP secrets in clear: write it with :func:`save_config`."""
    p = cfg.portal
    out = [
        "# lunsync configuration",
        "",
        "[portal]",
        f"listen = {_str_array(p.listen)}",
        f"nop_interval_s = {p.nop_interval_s}",
        f"nop_timeout_s = {p.nop_timeout_s}",
        f"login_timeout_s = {p.login_timeout_s}",
        f"max_sessions = {p.max_sessions}",
    ]
    for lun in cfg.luns:
        out += [
            "",
            "[[lun]]",
            f"name = {_q(lun.name)}",
            f"path = {_q(lun.path)}",
            f"size = {_size_value(lun.size_bytes)}",
            f"block_size = {lun.block_size}",
            f"thin = {_bool(lun.thin)}",
            f"read_only = {_bool(lun.read_only)}",
            f"chunk_size = {_size_value(lun.chunk_size_bytes)}",
        ]
        if lun.naa is not None:
            out.append(f"naa = {_q(lun.naa)}")
        if lun.serial is not None:
            out.append(f"serial = {_q(lun.serial)}")
    for target in cfg.targets:
        out += ["", "[[target]]", f"iqn = {_q(target.iqn)}"]
        if target.alias:
            out.append(f"alias = {_q(target.alias)}")
        out.append(f"acl = {_str_array(target.acl)}")
        maps = [f"{{ lun = {m.lun}, name = {_q(m.name)} }}" for m in target.luns]
        if len(maps) <= 1:
            out.append(f"luns = [{''.join(maps)}]")
        else:
            out += ["luns = [", *(f"    {m}," for m in maps), "]"]
        if target.chap is not None:
            c = target.chap
            out += ["", "[target.chap]", f"user = {_q(c.user)}", f"secret = {_q(c.secret)}"]
            if c.mutual_user is not None and c.mutual_secret is not None:
                out += [f"mutual_user = {_q(c.mutual_user)}", f"mutual_secret = {_q(c.mutual_secret)}"]
    return "\n".join(out) + "\n"


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` to ``path`` atomically (temp file, fsync, rename, fsync the directory) with mode 0600, since it
    may hold CHAP secrets. When this returns the file is durable."""
    name = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(name))
    fd, tmp = tempfile.mkstemp(prefix=".lunsync-config.", dir=directory)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_config(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

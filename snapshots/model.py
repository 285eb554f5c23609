"""The model: the pure, validated types every layer of lunsync shares, and nothing else.

This module owns what a LUN, a target, a portal and CHAP credentials *are* (the frozen configuration dataclasses,
each validated on construction, so one that exists is a valid one), what makes a logical unit itself
(:class:`LunIdentity`), and the size syntax (:func:`parse_size`, :func:`format_size`). The TOML file format around
these types is :mod:`lunsync.provider.config`'s; the catalog stores them; the SCSI layer reads identities from them.

Why here: DESIGN.md fixes the top level at ``target/``, ``snapshots/`` and ``provider/``, and puts ``snapshots/`` at
the bottom of the dependency order (``target/`` may reach it, it reaches nothing above it). A bottom layer every
package may import therefore has to live inside ``snapshots/`` and import nothing of lunsync itself: this module uses
only the standard library, performs no I/O and reads no clock, and ``make lint``'s import contracts hold it to that.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TypeVar

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
        return path_str(self.path)

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


def path_str(path: KeyPath) -> str:
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


def check_str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string, not {type_name(v)}")
    return v


def check_bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"must be true or false, not {type_name(v)}")
    return v


def check_int(v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"must be an integer, not {type_name(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"must be between {lo} and {hi}, not {v}")
    return v


def type_name(v: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table", tuple: "an array"}
    return names.get(type(v), type(v).__name__)


_LUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_lun_name(v: object) -> str:
    s = check_str(v)
    if not _LUN_NAME_RE.fullmatch(s) or ".." in s:
        raise ValueError(
            f"invalid LUN name {s!r}: 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, "
            "without '..'"
        )
    return s


def default_lun_path(name: str) -> str:
    """Where a LUN's backing file lives, relative to the data dir, when the configuration does not say."""
    return f"luns/{name}.img"


def check_lun_path(v: object) -> str:
    s = check_str(v)
    if not s or "\0" in s:
        raise ValueError("must be a non-empty path")
    if not os.path.isabs(s) and ".." in s.replace("\\", "/").split("/"):
        # A relative path is inside the data dir by contract; '..' would let a config file reach anywhere.
        raise ValueError(f"a relative path may not contain '..': {s!r} (use an absolute path)")
    norm = os.path.normpath(s)
    if norm in (".", "/"):
        raise ValueError(f"not a file path: {s!r}")
    return norm


# The backing stores a LUN may live on, by the name its configuration gives (lunsync.snapshots.backend registers an
# implementation under each). "file": a regular file, sparse when thin; "block": a raw block device, named by its
# absolute path; "rbd": a Ceph RBD image, named ``POOL/IMAGE`` (rbd's own notation) in the path.
BACKENDS = ("file", "block", "rbd")

# RBD pool and image names: what ``rbd create`` accepts, minus the separators of its own spec syntax ('/' between
# pool and image, '@' before a snapshot) and anything a shell or URL would need quoting for.
RBD_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
_RBD_NAME = re.compile(RBD_NAME_PATTERN)


def check_rbd_spec(v: object) -> str:
    """``POOL/IMAGE``, the path of an RBD-backed LUN."""
    s = check_str(v)
    pool, sep, image = s.partition("/")
    if not sep or not _RBD_NAME.fullmatch(pool) or not _RBD_NAME.fullmatch(image):
        raise ValueError(f"an RBD image is named POOL/IMAGE (letters, digits, '_', '.', '-'), not {s!r}")
    return s


def split_rbd_spec(spec: str) -> tuple[str, str]:
    """``("pool", "image")`` of a checked ``POOL/IMAGE``."""
    pool, _, image = check_rbd_spec(spec).partition("/")
    return pool, image


@dataclass(frozen=True, slots=True)
class CephConfig:
    """How the daemon reaches a Ceph cluster for its RBD-backed LUNs: the cluster's ``ceph.conf``, the keyring and
    the client name to authenticate as (cephx), and how long to wait for the monitors before giving up
    (``rados_mon_op_timeout``, ``client_mount_timeout``) and for an OSD operation (``rados_osd_op_timeout``; 0 waits
    for ever). An empty ``keyring`` leaves it to ``ceph.conf`` and librados' default search path."""

    conf_path: str = "/etc/ceph/ceph.conf"
    keyring: str = ""
    client: str = "client.admin"
    connect_timeout_s: int = 10
    op_timeout_s: int = 30

    def __post_init__(self) -> None:
        ctx: KeyPath = ("ceph",)
        _freeze(self, "conf_path", check_abs_path, ctx)
        if self.keyring:
            _freeze(self, "keyring", check_abs_path, ctx)
        _freeze(self, "client", check_ceph_client, ctx)
        _freeze(self, "connect_timeout_s", lambda v: check_int(v, 1, 3600), ctx)
        _freeze(self, "op_timeout_s", lambda v: check_int(v, 0, 3600), ctx)


def check_abs_path(v: object) -> str:
    s = check_str(v)
    if not os.path.isabs(s) or "\0" in s:
        raise ValueError(f"must be an absolute path, not {s!r}")
    return os.path.normpath(s)


def check_ceph_client(v: object) -> str:
    s = check_str(v)
    if not re.fullmatch(r"client\.[A-Za-z0-9_.-]{1,64}", s):
        raise ValueError(f"a Ceph client is named client.ID (e.g. client.admin), not {s!r}")
    return s


def default_backend(path: str) -> str:
    """The backend of a LUN whose configuration names none: ``block`` for a path under ``/dev/``, else ``file``.
    A rule on the configured text, so the choice is the configuration's and never a guess from what is on disk."""
    return "block" if path.startswith("/dev/") else "file"


def check_backend(v: object) -> str:
    s = check_str(v)
    if s not in BACKENDS:
        raise ValueError(f"unknown backend {s!r}: expected one of {', '.join(BACKENDS)}")
    return s


def check_block_size(v: object) -> int:
    if isinstance(v, bool) or v not in (512, 4096):
        raise ValueError(f"must be 512 or 4096, not {v!r}")
    assert isinstance(v, int)
    return v


def check_size(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise TypeError(f"must be bytes or a string like '10GiB', not {type_name(v)}")
    n = parse_size(v)
    if n <= 0:
        raise ValueError("must be greater than zero")
    if n > MAX_SIZE_BYTES:
        raise ValueError(f"{n} bytes is larger than the 64-bit maximum")
    return n


def check_chunk_size(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise TypeError(f"must be bytes or a string like '64KiB', not {type_name(v)}")
    n = parse_size(v)
    if n & (n - 1) or not CHUNK_MIN_BYTES <= n <= CHUNK_MAX_BYTES:
        raise ValueError(f"must be a power of two from 4KiB to 1MiB, not {format_size(n)}")
    return n


def check_naa(v: object) -> str:
    s = check_str(v).lower()
    if not re.fullmatch(r"6[0-9a-f]{31}", s):
        raise ValueError(f"must be an NAA IEEE Registered Extended designator (32 hex digits, starting 6), not {s!r}")
    return s


def check_serial(v: object) -> str:
    s = check_str(v)
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
        raise TypeError(f"an iSCSI name must be a string, not {type_name(name)}")
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


def check_iscsi_name(v: object) -> str:
    return normalize_iscsi_name(check_str(v))


def check_alias(v: object) -> str:
    s = check_str(v)
    if not s.isprintable() or len(s.encode()) > 255:
        raise ValueError("must be printable text of at most 255 bytes")
    return s


def check_lun_number(v: object) -> int:
    return check_int(v, 0, MAX_LUN_NUMBER)


def check_chap_user(v: object) -> str:
    s = check_str(v)
    if not s or not s.isprintable() or len(s.encode()) > 255:
        raise ValueError("must be 1-255 bytes of printable text")
    return s


def check_chap_secret(v: object) -> str:
    s = check_str(v)
    if not s or not s.isprintable() or len(s.encode()) > CHAP_SECRET_MAX_BYTES:
        raise ValueError(f"must be 1-{CHAP_SECRET_MAX_BYTES} bytes of printable text")
    return s


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv4 literal or bracketed IPv6 literal) into ``(host, port)``. Raises ``ValueError``
    (``TypeError`` for a non-string)."""
    if not isinstance(text, str):
        raise TypeError(f"a listen address must be a string, not {type_name(text)}")
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


def check_listen(v: object) -> str:
    host, port = parse_listen(check_str(v))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_listen_list(v: object) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"must be an array of HOST:PORT strings, not {type_name(v)}")
    if not v:
        raise ValueError("needs at least one address")
    out = tuple(check_listen(x) for x in v)
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


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*$")


def check_advertised(v: object) -> str:
    """One advertised portal: ``[IPV6]:PORT``, ``IPV4:PORT`` or ``NAME:PORT`` (RFC 7143 §13.8 allows a domain
    name), never a wildcard: initiators must be able to connect to it."""
    text = check_str(v)
    host, sep, port = text.rpartition(":")
    if text.startswith("[") or ":" in host or re.fullmatch(r"[0-9.]+", host):  # an IP literal (or a bad one)
        ip, num = parse_listen(text)
        if ipaddress.ip_address(ip).is_unspecified:
            raise ValueError(f"{text} is a wildcard: advertise an address initiators can connect to")
        return f"[{ip}]:{num}" if ":" in ip else f"{ip}:{num}"
    if not sep or not _HOSTNAME.match(host):
        raise ValueError(f"invalid advertised address {text!r}: expected NAME:PORT, IPV4:PORT or [IPV6]:PORT")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid port in {text!r}: expected 1-65535")
    return f"{host.lower()}:{int(port)}"


def check_advertise_list(v: object) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"must be an array of HOST:PORT strings, not {type_name(v)}")
    out = tuple(check_advertised(x) for x in v)
    for i, addr in enumerate(out):
        if addr in out[:i]:
            raise ValueError(f"{addr} is listed twice")
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
            raise TypeError(f"must be an array, not {type_name(v)}")
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
    advertise: tuple[str, ...] = ()  # empty: discovery answers the listen addresses (a wildcard's as reached)

    def __post_init__(self) -> None:
        ctx: KeyPath = ("portal",)
        _freeze(self, "listen", check_listen_list, ctx)
        _freeze(self, "advertise", check_advertise_list, ctx)
        _freeze(self, "nop_interval_s", lambda v: check_int(v, 0, 3600), ctx)
        _freeze(self, "nop_timeout_s", lambda v: check_int(v, 1, 3600), ctx)
        _freeze(self, "login_timeout_s", lambda v: check_int(v, 1, 3600), ctx)
        _freeze(self, "max_sessions", lambda v: check_int(v, 1, 65535), ctx)

    def addresses(self) -> tuple[tuple[str, int], ...]:
        """The listen addresses as ``(host, port)`` pairs, ready for ``loop.create_server``."""
        return tuple(parse_listen(a) for a in self.listen)


@dataclass(frozen=True, slots=True)
class LunConfig:
    """One logical unit and its backing store. ``backend`` names the kind of store (:data:`BACKENDS`; empty means
    :func:`default_backend` of the path). ``path`` is relative to the data dir unless absolute; an empty ``path``
    means :func:`default_lun_path`. ``naa``/``serial`` pin the identity (export writes them); absent, the catalog
    generates one when it creates the LUN."""

    name: str
    size_bytes: int
    path: str = ""
    block_size: int = 512
    thin: bool = True
    read_only: bool = False
    chunk_size_bytes: int = 64 << 10
    naa: str | None = None
    serial: str | None = None
    backend: str = ""

    def __post_init__(self) -> None:
        name = _freeze(self, "name", check_lun_name, ("lun",))
        ctx: KeyPath = (f"lun[{name!r}]",)
        if self.path == "" and self.backend == "rbd":
            raise ConfigError("an rbd LUN names its image: path = \"POOL/IMAGE\"", path=(*ctx, "path"))
        if self.path == "":
            object.__setattr__(self, "path", default_lun_path(name))
        path = _freeze(self, "path", check_lun_path, ctx)
        if self.backend == "":
            object.__setattr__(self, "backend", default_backend(path))
        backend = _freeze(self, "backend", check_backend, ctx)
        if backend == "rbd":
            _freeze(self, "path", check_rbd_spec, ctx)
        if backend == "block" and not os.path.isabs(path):
            raise ConfigError(f"a block device is named by its absolute path, not {path!r}", path=(*ctx, "path"))
        _freeze(self, "size_bytes", check_size, ctx)
        _freeze(self, "block_size", check_block_size, ctx)
        _freeze(self, "thin", check_bool, ctx)
        _freeze(self, "read_only", check_bool, ctx)
        _freeze(self, "chunk_size_bytes", check_chunk_size, ctx)
        if self.naa is not None:
            _freeze(self, "naa", check_naa, ctx)
        if self.serial is not None:
            _freeze(self, "serial", check_serial, ctx)
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
        _freeze(self, "lun", check_lun_number, ("luns",))
        _freeze(self, "name", check_lun_name, ("luns",))


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
        _freeze(self, "user", check_chap_user, ctx)
        _freeze(self, "secret", check_chap_secret, ctx)
        if (self.mutual_user is None) != (self.mutual_secret is None):
            missing = "mutual_secret" if self.mutual_secret is None else "mutual_user"
            raise ConfigError("mutual CHAP needs both mutual_user and mutual_secret", path=(*ctx, missing))
        if self.mutual_user is not None:
            _freeze(self, "mutual_user", check_chap_user, ctx)
            _freeze(self, "mutual_secret", check_chap_secret, ctx)
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
        iqn = _freeze(self, "iqn", check_iscsi_name, ("target",))
        ctx: KeyPath = (f"target[{iqn!r}]",)
        _freeze(self, "alias", check_alias, ctx)
        acl = _freeze(self, "acl", _tuple_of(check_iscsi_name), ctx)
        for i, name in enumerate(acl):
            if name in acl[:i]:
                raise ConfigError(f"initiator {name} is listed twice", path=(*ctx, "acl", i))
        object.__setattr__(self, "acl", tuple(sorted(acl)))
        maps = self.luns
        if not isinstance(maps, (list, tuple)) or not all(isinstance(m, LunMapping) for m in maps):
            raise ConfigError("must be a sequence of LunMapping", path=(*ctx, "luns"))
        check_mappings(maps, (*ctx, "luns"))
        object.__setattr__(self, "luns", tuple(sorted(maps, key=lambda m: m.lun)))
        if self.chap is not None and not isinstance(self.chap, ChapConfig):
            raise ConfigError("must be a ChapConfig", path=(*ctx, "chap"))

    def lun_names(self) -> dict[int, str]:
        return {m.lun: m.name for m in self.luns}


def check_mappings(maps: Sequence[LunMapping], ctx: KeyPath) -> None:
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
    ceph: CephConfig = field(default_factory=CephConfig)

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


# --- identity --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LunIdentity:
    """What makes a logical unit itself across restarts: VPD 0x80 serial and the 0x83 NAA designator."""

    naa: bytes  # 16 bytes, NAA IEEE Registered Extended (type 6)
    serial: str
    vendor: str = "LUNSYNC"
    product: str = "VIRTUAL-DISK"
    revision: str = "0001"
    extra: dict[str, str] = field(default_factory=dict)


# --- labels ----------------------------------------------------------------------------------------------------------

# Labels are the user's own key=value tags on LUNs and snapshots, for finding them again (`?label=env=prod`). The rule
# is Kubernetes-like so that names a CSI driver or an orchestrator already uses fit unchanged.
LABEL_KEY_PATTERN = r"^[A-Za-z0-9._/-]{1,63}$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9._/-]{0,63}$"
MAX_LABELS = 64
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """``labels`` if every key and value follows the rule, sorted by key; else a ConfigError that says which and why."""
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"too many labels: {len(labels)}, at most {MAX_LABELS}")
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k):
            raise ConfigError(f"label key {k!r} is not valid: use 1-63 characters from A-Z a-z 0-9 . _ / -")
        if not isinstance(v, str) or not _LABEL_VALUE.fullmatch(v):
            raise ConfigError(f"label {k}: value {v!r} is not valid: use at most 63 characters from "
                              "A-Z a-z 0-9 . _ / -")
    return dict(sorted(labels.items()))


def parse_label(text: str) -> tuple[str, str]:
    """``key=value`` as a checked pair (the value may be empty; the first ``=`` splits)."""
    key, eq, value = text.partition("=")
    if not eq:
        raise ConfigError(f"label {text!r} is not key=value")
    check_labels({key: value})
    return key, value


def labels_match(labels: dict[str, str], wanted: Sequence[tuple[str, str]]) -> bool:
    """Whether ``labels`` carries every ``(key, value)`` of ``wanted`` (an AND of the filters)."""
    return all(labels.get(k) == v for k, v in wanted)


# --- time ------------------------------------------------------------------------------------------------------------


def rfc3339(t: float) -> str:
    """An epoch time as RFC 3339 in UTC with microseconds: the one form of every timestamp the catalog stores and the
    API answers."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="microseconds")

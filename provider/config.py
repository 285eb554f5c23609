"""The configuration file: the TOML users write, parsed into the model's frozen dataclasses, and written back.

This module owns the file format read by ``lunsync serve --config FILE`` and ``lunsync apply FILE`` and written by
``lunsync export``: parsing with each error placed at its key and line, warnings about unwise settings, and an atomic
writer. The types themselves, their validation and the size syntax live in :mod:`lunsync.snapshots.model`, the
bottom layer the catalog and the SCSI layer share; they are re-exported here for the file's users. The catalog
(:mod:`lunsync.snapshots.catalog`) owns the runtime state and reconciles itself to a :class:`Config`. The format::

    [portal]                                   # optional; every key has a default
    listen = ["127.0.0.1:3260", "[::1]:3260"]  # HOST:PORT, IPv4 or [IPv6] literal; default ["127.0.0.1:3260"]
    advertise = ["array.example.net:3260"]     # optional: what discovery answers instead of the listen addresses
                                               #   (NAT, containers); HOST:PORT, a name or an IP literal
    nop_interval_s = 30                        # NOP-In keepalive interval; 0 = off
    nop_timeout_s = 15                         # drop the connection when a NOP-In goes unanswered this long
    login_timeout_s = 15                       # a login must reach full feature phase within this
    max_sessions = 256

    [ceph]                                     # optional: the cluster of the LUNs with backend = "rbd"
    conf_path = "/etc/ceph/ceph.conf"          # the cluster's ceph.conf (monitors, auth settings)
    keyring = "/etc/ceph/ceph.client.lunsync.keyring"  # optional; default: what ceph.conf and librados find
    client = "client.admin"                    # the cephx user to connect as, client.ID
    connect_timeout_s = 10                     # give up on unreachable monitors after this (1..3600)
    op_timeout_s = 30                          # an OSD request that takes longer fails (0 = wait for ever)

    [[lun]]                                    # one table per LUN
    name = "db0"                               # [A-Za-z0-9][A-Za-z0-9._-]{0,63}, no ".."; unique
    backend = "file"                           # optional: "file" (a regular file), "block" (a raw block
                                               #   device) or "rbd" (an existing Ceph RBD image); default
                                               #   "block" for a /dev/... path, else "file"
    path = "luns/db0.img"                      # optional; relative to the data dir (no ".."); default
                                               #   luns/<name>.img; a block device by its absolute path; an
                                               #   rbd image as POOL/IMAGE
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
import os
import re
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from lunsync.snapshots.fsutil import atomic_write
from lunsync.snapshots.model import (
    CHAP_SECRET_MAX_WINDOWS,
    CHAP_SECRET_MIN_ADVISED,
    DEFAULT_LISTEN,
    MAX_LUN_NUMBER,
    CephConfig,
    ChapConfig,
    Config,
    ConfigError,
    KeyPath,
    LunConfig,
    LunMapping,
    PortalConfig,
    TargetConfig,
    check_abs_path,
    check_advertise_list,
    check_alias,
    check_backend,
    check_block_size,
    check_bool,
    check_ceph_client,
    check_chap_secret,
    check_chap_user,
    check_chunk_size,
    check_int,
    check_iscsi_name,
    check_listen_list,
    check_lun_name,
    check_lun_number,
    check_lun_path,
    check_mappings,
    check_naa,
    check_serial,
    check_size,
    default_lun_path,
    format_size,
    normalize_iscsi_name,
    parse_listen,
    parse_size,
    path_str,
    type_name,
)

__all__ = [
    "DEFAULT_LISTEN",
    "MAX_LUN_NUMBER",
    "ChapConfig",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "HookConfig",
    "LunConfig",
    "LunMapping",
    "PortalConfig",
    "TargetConfig",
    "config_warnings",
    "default_lun_path",
    "dump_config",
    "format_size",
    "load_config",
    "load_hooks",
    "normalize_iscsi_name",
    "parse_config",
    "parse_hooks",
    "parse_listen",
    "parse_size",
    "save_config",
]

T = TypeVar("T")


class ConfigWarning(UserWarning):
    """A legal but unwise setting (a short CHAP secret). Emitted by :func:`parse_config`."""


def config_warnings(cfg: Config) -> list[str]:
    """Advice about legal but unwise settings, for the daemon to log (the parser emits it as :class:`ConfigWarning`)."""
    return [f"{path_str(path)}: {msg}" for path, msg in _warnings(cfg)]


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

_PORTAL_KEYS = ("listen", "advertise", "nop_interval_s", "nop_timeout_s", "login_timeout_s", "max_sessions")
_LUN_KEYS = ("name", "backend", "path", "size", "block_size", "thin", "read_only", "chunk_size", "naa", "serial")
_TARGET_KEYS = ("iqn", "alias", "acl", "luns", "chap")
_MAPPING_KEYS = ("lun", "name")
_CHAP_KEYS = ("user", "secret", "mutual_user", "mutual_secret")
_CEPH_KEYS = ("conf_path", "keyring", "client", "connect_timeout_s", "op_timeout_s")
_TOP_KEYS = ("portal", "ceph", "lun", "target")


class _Parser:
    """Turns the dict tomllib produced into a :class:`Config`, naming the line of anything wrong."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.where = _KeyLines(text)

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        raise ConfigError(message, path=path, line=self.where.line_of(path), source=self.source)

    def table(self, value: object, path: KeyPath, known: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be a table, not {type_name(value)}")
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
            self.fail(path, f"must be an array, not {type_name(value)}")
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
        ceph = self.ceph(raw.get("ceph", {}))
        try:
            return Config(portal=portal, luns=luns, targets=targets, ceph=ceph)
        except ConfigError as e:
            raise e.located(self.source, self.where.line_of(e.path)) from None

    def portal(self, value: object) -> PortalConfig:
        path: KeyPath = ("portal",)
        t = self.table(value, path, _PORTAL_KEYS)
        kw: dict[str, Any] = {}
        if "listen" in t:
            kw["listen"] = self.get(t, path, "listen", check_listen_list)
        if "advertise" in t:
            kw["advertise"] = self.get(t, path, "advertise", check_advertise_list)
        for key, lo in (("nop_interval_s", 0), ("nop_timeout_s", 1), ("login_timeout_s", 1)):
            if key in t:
                kw[key] = self.get(t, path, key, functools.partial(check_int, lo=lo, hi=3600))
        if "max_sessions" in t:
            kw["max_sessions"] = self.get(t, path, "max_sessions", lambda v: check_int(v, 1, 65535))
        return self.built(path, lambda: PortalConfig(**kw))

    def ceph(self, value: object) -> CephConfig:
        path: KeyPath = ("ceph",)
        t = self.table(value, path, _CEPH_KEYS)
        kw: dict[str, Any] = {}
        for key, check in (("conf_path", check_abs_path), ("keyring", check_abs_path), ("client", check_ceph_client),
                           ("connect_timeout_s", functools.partial(check_int, lo=1, hi=3600)),
                           ("op_timeout_s", functools.partial(check_int, lo=0, hi=3600))):
            if key in t:
                kw[key] = self.get(t, path, key, check)
        return self.built(path, lambda: CephConfig(**kw))

    def lun(self, value: object, path: KeyPath) -> LunConfig:
        t = self.table(value, path, _LUN_KEYS, required=("name", "size"))
        kw: dict[str, Any] = {
            "name": self.get(t, path, "name", check_lun_name),
            "size_bytes": self.get(t, path, "size", check_size),
        }
        for key, attr, check in (
            ("backend", "backend", check_backend),
            ("path", "path", check_lun_path),
            ("block_size", "block_size", check_block_size),
            ("thin", "thin", check_bool),
            ("read_only", "read_only", check_bool),
            ("chunk_size", "chunk_size_bytes", check_chunk_size),
            ("naa", "naa", check_naa),
            ("serial", "serial", check_serial),
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
        kw: dict[str, Any] = {"iqn": self.get(t, path, "iqn", check_iscsi_name)}
        if "alias" in t:
            kw["alias"] = self.get(t, path, "alias", check_alias)
        if "acl" in t:
            acl = self.array(t["acl"], (*path, "acl"))
            names = [self.item(v, (*path, "acl", i), check_iscsi_name) for i, v in enumerate(acl)]
            for i, name in enumerate(names):
                if name in names[:i]:
                    self.fail((*path, "acl", i), f"initiator {name} is listed twice")
            kw["acl"] = tuple(names)
        if "luns" in t:
            maps: list[LunMapping] = []
            for i, m in enumerate(self.array(t["luns"], (*path, "luns"))):
                mpath = (*path, "luns", i)
                mt = self.table(m, mpath, _MAPPING_KEYS, required=_MAPPING_KEYS)
                maps.append(LunMapping(self.get(mt, mpath, "lun", check_lun_number), self.get(mt, mpath, "name", check_lun_name)))
            try:
                check_mappings(maps, (*path, "luns"))
            except ConfigError as e:
                self.fail(e.path, e.message)
            kw["luns"] = tuple(maps)
        if "chap" in t:
            kw["chap"] = self.chap(t["chap"], (*path, "chap"))
        return self.built(path, lambda: TargetConfig(**kw))

    def chap(self, value: object, path: KeyPath) -> ChapConfig:
        t = self.table(value, path, _CHAP_KEYS, required=("user", "secret"))
        kw = {key: self.get(t, path, key, check_chap_user if "user" in key else check_chap_secret) for key in t}
        if ("mutual_user" in kw) != ("mutual_secret" in kw):
            self.fail(path, "mutual CHAP needs both mutual_user and mutual_secret")
        if "mutual_secret" in kw and kw["mutual_secret"] == kw["secret"]:
            self.fail((*path, "mutual_secret"), "mutual_secret must differ from secret")
        return self.built(path, lambda: ChapConfig(**kw))


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ConfigError(f"invalid TOML: {e}", line=int(m[1]) if m else None, source=source) from None


def _read_text(name: str) -> str:
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", source=name) from None


# --- restore hooks ---------------------------------------------------------------------------------------------------

_HOOK_KEYS = ("command", "timeout_s")
_HOOK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOOK_TIMEOUT_S = 300


@dataclass(frozen=True, slots=True)
class HookConfig:
    """A restore hook the server's hook file defines: an argv run without a shell, by name only. The API can name a
    hook; it can never say what runs."""

    name: str
    command: tuple[str, ...]
    timeout_s: int = HOOK_TIMEOUT_S


def _hook_command(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and "\0" not in x for x in v):
        raise TypeError("must be a non-empty array of strings: the program and its arguments (no shell)")
    if not os.path.isabs(v[0]):
        raise ValueError(f"the program must be an absolute path, not {v[0]!r}")
    return tuple(v)


def parse_hooks(text: str, *, source: str = "<hooks>") -> dict[str, HookConfig]:
    """Parse a hook file (``[hook.NAME]`` tables with ``command`` and ``timeout_s``). Raises :class:`ConfigError`
    naming the file, line and key."""
    raw = _toml(text, source)
    parser = _Parser(source, text)
    parser.table(raw, (), ("hook",))
    hooks = parser.table(raw.get("hook", {}), ("hook",), tuple(raw.get("hook", {})))
    out: dict[str, HookConfig] = {}
    for name, value in hooks.items():
        path: KeyPath = ("hook", name)
        if not _HOOK_NAME.match(name):
            parser.fail(path, f"hook name {name!r} must be 1-64 characters from A-Z a-z 0-9 . _ -, starting with a "
                              "letter or digit")
        t = parser.table(value, path, _HOOK_KEYS, required=("command",))
        timeout = parser.get(t, path, "timeout_s", lambda v: check_int(v, 1, 86400)) if "timeout_s" in t else None
        out[name] = HookConfig(name, parser.get(t, path, "command", _hook_command),
                               HOOK_TIMEOUT_S if timeout is None else timeout)
    return out


def load_hooks(path: str | os.PathLike[str]) -> dict[str, HookConfig]:
    """Read a hook file. It says what the daemon runs, so like sudoers it must not be writable by anyone but its
    owner, and its owner must be root or the daemon's own user."""
    name = os.fspath(path)
    st = os.stat(name)
    if st.st_mode & 0o022:
        raise ConfigError(f"is writable by group or others (mode {st.st_mode & 0o777:04o}); chmod go-w it",
                          source=name)
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"is owned by uid {st.st_uid}, neither root nor this daemon's user", source=name)
    text = _read_text(name)
    return parse_hooks(text, source=name)


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Parse the TOML text of a configuration. Raises :class:`ConfigError` naming the file, line and key; warns
    (:class:`ConfigWarning`) about legal but unwise settings."""
    raw = _toml(text, source)
    parser = _Parser(source, text)
    cfg = parser.config(raw)
    for path, msg in _warnings(cfg):
        line = parser.where.line_of(path)
        warnings.warn(ConfigWarning(f"{source}:{line}: {path_str(path)}: {msg}"), stacklevel=2)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a configuration file."""
    name = os.fspath(path)
    text = _read_text(name)
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
        *([f"advertise = {_str_array(p.advertise)}"] if p.advertise else []),
        f"nop_interval_s = {p.nop_interval_s}",
        f"nop_timeout_s = {p.nop_timeout_s}",
        f"login_timeout_s = {p.login_timeout_s}",
        f"max_sessions = {p.max_sessions}",
    ]
    if cfg.ceph != CephConfig():
        ce = cfg.ceph
        out += ["", "[ceph]", f"conf_path = {_q(ce.conf_path)}",
                *([f"keyring = {_q(ce.keyring)}"] if ce.keyring else []), f"client = {_q(ce.client)}",
                f"connect_timeout_s = {ce.connect_timeout_s}", f"op_timeout_s = {ce.op_timeout_s}"]
    for lun in cfg.luns:
        out += [
            "",
            "[[lun]]",
            f"name = {_q(lun.name)}",
            f"backend = {_q(lun.backend)}",
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
    """Write ``cfg`` to ``path`` atomically (:func:`~lunsync.snapshots.fsutil.atomic_write`) with mode 0600, since it
    may hold CHAP secrets. When this returns the file is durable."""
    atomic_write(path, dump_config(cfg))

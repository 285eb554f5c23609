"""What the iSCSI layer needs to know about the array: targets, their ACLs, CHAP credentials and portals.

The provider fills a :class:`Directory` from the catalog and mutates it live (a new LUN, an ACL change); sessions
look targets up here at login time and at discovery. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from lunsync.target.scsi.target import ScsiTarget


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """CHAP secrets for one target: the initiator proves ``user``/``secret``; with mutual CHAP the target proves
    ``mutual_user``/``mutual_secret`` back."""

    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None

    def __repr__(self) -> str:
        return f"ChapCredentials(user={self.user!r}, mutual_user={self.mutual_user!r}, secrets=***)"


@dataclass(frozen=True, slots=True)
class PortalAddress:
    """One network portal: where initiators connect, and the portal group it belongs to."""

    host: str
    port: int
    tpgt: int = 1

    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port},{self.tpgt}"

    @property
    def wildcard(self) -> bool:
        """Listening on every address of a family (0.0.0.0, ::): not an address an initiator can connect to."""
        try:
            return ipaddress.ip_address(self.host).is_unspecified
        except ValueError:  # a host name (advertised portals may be names)
            return False

    def serves(self, local: tuple[str, int]) -> bool:
        """Whether a connection whose local end is ``local`` came in through this portal."""
        host, port = local
        if port != self.port:
            return False
        try:
            mine, theirs = ipaddress.ip_address(self.host), ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if mine.is_unspecified:
            # Same family: an IPv6 socket without IPV6_V6ONLY sees IPv4 peers as ::ffff:a.b.c.d, still IPv6.
            return mine.version == theirs.version
        return mine == _unmapped(host)


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as the initiator sees it: ``::ffff:a.b.c.d`` is IPv4 ``a.b.c.d``; a zone (``%eth0``) is dropped."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(slots=True)
class TargetEntry:
    """One iSCSI target as login and discovery see it."""

    name: str
    scsi: ScsiTarget
    alias: str = ""
    acl: frozenset[str] = frozenset()  # empty: any initiator may log in
    chap: ChapCredentials | None = None
    enabled: bool = True

    def allows(self, initiator: str) -> bool:
        return not self.acl or initiator.lower() in self.acl


@dataclass(slots=True)
class Directory:
    """The live set of targets and portals."""

    targets: dict[str, TargetEntry] = field(default_factory=dict)
    portals: list[PortalAddress] = field(default_factory=list)
    # Set for NAT and containers: the addresses initiators must use, answered instead of what the portals bind.
    advertise: list[PortalAddress] = field(default_factory=list)

    def target_addresses(self, local: tuple[str, int] | None) -> list[str]:
        """The ``TargetAddress`` values of a SendTargets answer (RFC 7143 §13.8) given on a connection whose local
        end is ``local``: the advertised portals when set; else every portal, with a wildcard one replaced by the
        address this connection reached, which the initiator has just shown it can use. A wildcard portal the
        connection did not come through is left out: which of the host's addresses would reach it is unknown."""
        if self.advertise:
            return [p.text() for p in self.advertise]
        out: list[str] = []
        for p in self.portals:
            if not p.wildcard:
                text = p.text()
            elif local is not None and p.serves(local):
                text = PortalAddress(str(_unmapped(local[0])), p.port, p.tpgt).text()
            else:
                continue
            if text not in out:
                out.append(text)
        return out

    def lookup(self, name: str) -> TargetEntry | None:
        t = self.targets.get(name.lower())
        return t if t is not None and t.enabled else None

    def add(self, entry: TargetEntry) -> None:
        self.targets[entry.name.lower()] = entry

    def remove(self, name: str) -> TargetEntry | None:
        return self.targets.pop(name.lower(), None)

    def visible_to(self, initiator: str) -> list[TargetEntry]:
        """Targets that discovery may show this initiator: only those its ACLs admit."""
        return [t for t in self.targets.values() if t.enabled and t.allows(initiator)]

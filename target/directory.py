"""What the iSCSI layer needs to know about the array: targets, their ACLs, CHAP credentials and portals.

The provider fills a :class:`Directory` from the catalog and mutates it live (a new LUN, an ACL change); sessions
look targets up here at login time and at discovery. Nothing here does I/O.
"""

from __future__ import annotations

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

"""What discovery answers (Directory.target_addresses): wildcard portals as the address the connection reached,
IPv4-mapped peers as IPv4, IPv6 in brackets, and the advertised portals instead of all that when set."""

from __future__ import annotations

from lunsync.target.directory import Directory, PortalAddress


def addresses(portals: list[PortalAddress], local: tuple[str, int] | None,
              advertise: tuple[PortalAddress, ...] = ()) -> list[str]:
    return Directory(portals=portals, advertise=list(advertise)).target_addresses(local)


def test_specific_portals_are_answered_as_they_are() -> None:
    portals = [PortalAddress("192.0.2.1", 3260), PortalAddress("2001:db8::1", 3260)]
    assert addresses(portals, ("192.0.2.1", 3260)) == ["192.0.2.1:3260,1", "[2001:db8::1]:3260,1"]


def test_a_wildcard_portal_is_answered_as_the_local_address_of_the_connection() -> None:
    portals = [PortalAddress("0.0.0.0", 3260), PortalAddress("::", 3260)]
    assert addresses(portals, ("10.1.2.3", 3260)) == ["10.1.2.3:3260,1"]
    assert addresses(portals, ("127.0.0.2", 3260)) == ["127.0.0.2:3260,1"]
    assert addresses(portals, ("fd00::7", 3260)) == ["[fd00::7]:3260,1"]
    # A dual-stack IPv6 socket sees an IPv4 initiator as ::ffff:a.b.c.d; it is told the IPv4 address.
    assert addresses([PortalAddress("::", 3260)], ("::ffff:10.1.2.3", 3260)) == ["10.1.2.3:3260,1"]
    # A link-local address's zone is the target's own interface name: meaningless to the initiator.
    assert addresses([PortalAddress("::", 3260)], ("fe80::1%eth0", 3260)) == ["[fe80::1]:3260,1"]


def test_a_wildcard_the_connection_did_not_come_through_is_left_out() -> None:
    portals = [PortalAddress("0.0.0.0", 3260), PortalAddress("0.0.0.0", 3261), PortalAddress("127.0.0.1", 3262)]
    assert addresses(portals, ("10.1.2.3", 3261)) == ["10.1.2.3:3261,1", "127.0.0.1:3262,1"]
    assert addresses(portals, None) == ["127.0.0.1:3262,1"]
    assert addresses([PortalAddress("::", 3260)], ("10.1.2.3", 3260)) == []


def test_a_specific_portal_and_the_wildcards_answer_never_repeat_an_address() -> None:
    portals = [PortalAddress("0.0.0.0", 3260), PortalAddress("::", 3260)]
    assert addresses(portals + [PortalAddress("10.1.2.3", 3260)], ("10.1.2.3", 3260)) == ["10.1.2.3:3260,1"]


def test_advertised_portals_replace_everything_else() -> None:
    advertised = (PortalAddress("array.example.net", 3260), PortalAddress("2001:db8::a", 3260))
    got = addresses([PortalAddress("0.0.0.0", 3260)], ("172.17.0.2", 3260), advertised)
    assert got == ["array.example.net:3260,1", "[2001:db8::a]:3260,1"]

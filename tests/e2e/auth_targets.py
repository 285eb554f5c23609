"""The three authentication targets that test_auth and test_security both serve: one-way CHAP, mutual CHAP and an
initiator ACL, each with one thin LUN. Each module passes its own names, so their daemons stay told apart in logs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuthTargets:
    chap_iqn: str
    mutual_iqn: str
    acl_iqn: str
    user: str
    secret: str
    m_user: str
    m_secret: str
    target_user: str
    target_secret: str
    allowed: str

    def toml(self, lun_size: str) -> str:
        """The [[lun]] and [[target]] tables of the three targets, LUNs of ``lun_size`` named chap0, mutual0, acl0."""
        luns = "".join(f'[[lun]]\nname = "{name}"\nsize = "{lun_size}"\nthin = true\n\n'
                       for name in ("chap0", "mutual0", "acl0"))
        return luns + f"""[[target]]
iqn = "{self.chap_iqn}"
luns = [{{lun = 0, name = "chap0"}}]
[target.chap]
user = "{self.user}"
secret = "{self.secret}"

[[target]]
iqn = "{self.mutual_iqn}"
luns = [{{lun = 0, name = "mutual0"}}]
[target.chap]
user = "{self.m_user}"
secret = "{self.m_secret}"
mutual_user = "{self.target_user}"
mutual_secret = "{self.target_secret}"

[[target]]
iqn = "{self.acl_iqn}"
luns = [{{lun = 0, name = "acl0"}}]
acl = ["{self.allowed}"]
"""

"""The systemd readiness protocol (sd_notify), without libsystemd.

This module owns the one datagram the daemon sends to ``$NOTIFY_SOCKET`` when every listener is up
(``READY=1``), the status line, and ``STOPPING=1`` on shutdown, so the unit in ``deploy/lunsync.service`` can be
``Type=notify``: units ordered after lunsync start only once initiators can log in and the API answers. Outside
systemd (no ``NOTIFY_SOCKET``) every call is a no-op. See sd_notify(3) for the protocol.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("lunsync.systemd")


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields to the service manager. True when a datagram was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    # A leading '@' names a socket in the abstract namespace, which the kernel spells with a NUL byte.
    address = "\0" + path[1:] if path.startswith("@") else path
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as e:
        # Readiness is advisory to us; systemd will time the unit out if it never hears it, which names the cause.
        log.warning("sd_notify to %s failed: %s", path, e)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def stopping(status: str = "draining in-flight commands") -> bool:
    return notify("STOPPING=1", f"STATUS={status}")

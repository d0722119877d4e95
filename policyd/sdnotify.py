"""Telling systemd how policyd is doing (sd_notify(3)), without libsystemd.

With ``Type=notify`` systemd starts Postfix (``Before=postfix.service``) and
returns from ``systemctl start`` only once policyd said READY=1, i.e. once
it listens; ``systemctl reload`` waits for a reload to end; a stop is shown
as stopping.  Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op.
A message that cannot be sent within SD_NOTIFY_TIMEOUT_SECONDS (systemd
busy, its queue full) is logged as a warning and otherwise ignored: the
service must not fail because its supervisor is slow or went away.
"""

from __future__ import annotations

import logging
import os
import socket

from memtable import clock
from policyd import limits

log = logging.getLogger("policyd.sdnotify")


def notify_address(value: str | None) -> str | None:
    """The datagram address named by $NOTIFY_SOCKET: a path, or an abstract
    name (``@name`` -> NUL + name); None when unset or unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not used by the units shipped here


def notify(*fields: str) -> bool:
    """Send ``NAME=value`` fields as one message; True when it was sent."""
    address = notify_address(os.environ.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A full queue (systemd busy at boot) drains in time; waiting
            # briefly beats losing READY=1, which would make systemd kill us.
            sock.settimeout(limits.SD_NOTIFY_TIMEOUT_SECONDS)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot tell systemd %s: %s", fields[0], exc.strerror or exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) asks for; older
    # systemd ignores it.  CLOCK_MONOTONIC, through the clock seam.
    return notify("RELOADING=1", f"MONOTONIC_USEC={int(clock.monotonic() * 1_000_000)}")


def stopping() -> bool:
    return notify("STOPPING=1")

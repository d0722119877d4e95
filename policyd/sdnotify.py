"""Telling systemd how policyd is doing (sd_notify(3)), without libsystemd.

With ``Type=notify`` systemd starts Postfix (``Before=postfix.service``) and
returns from ``systemctl start`` only once policyd said READY=1, i.e. once
it listens; ``systemctl status`` shows a reload in progress and a stop.
Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op.  The first
READY=1 waits up to SD_NOTIFY_TIMEOUT_SECONDS for room in systemd's queue
(lost, systemd would kill policyd at TimeoutStartSec); later messages run on
the event loop while it serves, so they never wait (``wait`` 0).  A message that cannot
be sent is logged as a warning and otherwise ignored.
"""

from __future__ import annotations

import logging
import os
import socket

from memtable import clock

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


def notify(*fields: str, wait: float = 0.0) -> bool:
    """Send ``NAME=value`` fields as one message; True when it was sent.
    ``wait``: the seconds it may wait for room in systemd's queue (0: none)."""
    address = notify_address(os.environ.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Connected: an unconnected datagram socket always polls as
            # writable, so a timed send would spin instead of sleeping.
            sock.settimeout(wait)
            sock.connect(address)
            sock.send("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot tell systemd %s: %s", fields[0], exc.strerror or exc)
        return False
    return True


def ready(status: str, wait: float = 0.0) -> bool:
    return notify("READY=1", f"STATUS={status}", wait=wait)


def reloading() -> bool:
    # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) asks for; older
    # systemd ignores it.  CLOCK_MONOTONIC, through the clock seam.
    return notify("RELOADING=1", f"MONOTONIC_USEC={int(clock.monotonic() * 1_000_000)}")


def stopping() -> bool:
    return notify("STOPPING=1")

"""The one clock seam of memtable and policyd.

Everything that needs the time of day, a monotonic deadline or a pause calls
these functions, so tests can move time (freezegun patches time.time and
time.monotonic) and never sleep for real.
"""

from __future__ import annotations

import asyncio
import time


def now() -> float:
    """Wall-clock UNIX time in seconds (used for ttls and records)."""
    return time.time()


def monotonic() -> float:
    """Monotonic seconds (used for deadlines and latencies)."""
    return time.monotonic()


def sleep(seconds: float) -> None:
    """Blocking pause between memcache retries."""
    if seconds > 0:
        time.sleep(seconds)


async def async_sleep(seconds: float) -> None:
    """The event loop's pause between memcache retries (memtable.awire)."""
    if seconds > 0:
        await asyncio.sleep(seconds)

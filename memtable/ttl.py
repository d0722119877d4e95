"""memcached's expiration rule, in one place.

memcached reads an expiration time of at most 30 days (2592000 s) as
relative to now, and anything larger as an absolute UNIX time.  Postfix sends
the configured ttl as is, so ``ttl = 7776000`` (90 days) would be read as a
date in 1970 and expire the item at once.  memtable sends such ttls as
absolute time (now + ttl) instead; 0 still means "never expires".
"""

from __future__ import annotations

from memtable import clock
from memtable.errors import ConfigError
from memtable.limits import CF_INT_MAX, MEMCACHED_RELATIVE_TTL_MAX


def wire_exptime(ttl: int) -> int:
    """The exptime to send to memcached for a ttl in seconds."""
    if ttl < 0:
        raise ConfigError(f"negative ttl {ttl}")
    if ttl <= MEMCACHED_RELATIVE_TTL_MAX:
        return ttl
    exptime = int(clock.now()) + ttl
    if exptime > 2**32 - 1:
        raise ConfigError(f"ttl {ttl} reaches past the year 2106, which memcached cannot store")
    return exptime


def describe(ttl: int) -> str:
    """A one-line explanation of a ttl, for `memtable ttl` and docs."""
    if ttl == 0:
        return "0: items never expire (memcached may still evict them when full)"
    if ttl <= MEMCACHED_RELATIVE_TTL_MAX:
        return f"{ttl}s: relative; memtable and Postfix both send {ttl}"
    days = ttl / 86400
    return (f"{ttl}s ({days:.4g} days): over memcached's 30-day limit; memtable sends "
            f"now+{ttl} as an absolute time, Postfix sends {ttl}, which memcached reads "
            "as a date in 1970, so Postfix's items expire at once")


assert CF_INT_MAX < 2**32

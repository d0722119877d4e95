"""What policyd knows about a client beyond one triplet.

A client record counts greylisting outcomes per client key; after
``auto_whitelist_clients`` passes (counted at most once per hour, as
postgrey's --auto-whitelist-clients) the client skips greylisting.  The
postscreen part reads Postfix postscreen's cache: a client that passed every
enabled postscreen test recently is no spam bot, and greylisting it again
only delays mail.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from policyd import limits

log = logging.getLogger(__name__)

# first_seen,last_seen,deferred,passed,last_pass: ASCII decimal numbers only.
_CLIENT_RECORD = re.compile(r"(\d+),(\d+),(\d+),(\d+),(\d+)", re.ASCII)


@dataclass(frozen=True)
class ClientRecord:
    """Stored as ``first_seen,last_seen,deferred,passed,last_pass`` (UNIX
    times and counts; last_pass 0 = no pass counted yet)."""

    first_seen: int
    last_seen: int
    deferred: int = 0
    passed: int = 0
    last_pass: int = 0

    @classmethod
    def new(cls, now: int) -> ClientRecord:
        return cls(first_seen=now, last_seen=now)

    def serialise(self) -> str:
        return (f"{self.first_seen},{self.last_seen},{self.deferred},"
                f"{self.passed},{self.last_pass}")

    @classmethod
    def parse(cls, value: str) -> ClientRecord:
        """The record in ``value``; ValueError when it is not one."""
        if len(value) > limits.RECORD_MAX_CHARS:
            raise ValueError("client record too long")
        match = _CLIENT_RECORD.fullmatch(value)
        if match is None:
            raise ValueError(f"malformed client record {value!r}")
        first, last, deferred, passed, last_pass = map(int, match.groups())
        return cls(first, last, deferred, passed, last_pass)

    # The successors are built directly: dataclasses.replace() costs several
    # times more, and one runs per request.
    def seen(self, now: int) -> ClientRecord:
        return ClientRecord(self.first_seen, now, self.deferred, self.passed, self.last_pass)

    def defer(self, now: int) -> ClientRecord:
        return ClientRecord(self.first_seen, now, self.deferred + 1, self.passed,
                            self.last_pass)

    def count_pass(self, now: int) -> ClientRecord:
        """A triplet of this client ended its delay: one more pass, unless a
        pass was counted in the last hour (or the record is from the future:
        a clock went back, as postgrey allows)."""
        if (self.last_pass == 0 or now >= self.last_pass + limits.PASS_COUNT_INTERVAL
                or self.last_pass > now):
            return ClientRecord(self.first_seen, now, self.deferred, self.passed + 1, now)
        return self.seen(now)

    def auto_whitelisted(self, threshold: int) -> bool:
        """True after ``threshold`` counted passes (0 turns this off)."""
        return threshold > 0 and self.passed >= threshold

    def expired(self, now: int, max_age: int) -> bool:
        """Unseen for more than max_age: counts no more (a backup table may
        keep it after memcached dropped it)."""
        return now - self.last_seen > max_age

    def needs_refresh(self, now: int) -> bool:
        """Rewrite last_seen (and so the ttl) at most once an interval."""
        return not 0 <= now - self.last_seen < limits.RECORD_REFRESH_INTERVAL


def load_client_record(value: str | None, now: int, max_age: int) -> ClientRecord | None:
    """The stored record, or None when absent, older than max_age (a backup
    table may not expire entries) or malformed (logged)."""
    if value is None:
        return None
    try:
        record = ClientRecord.parse(value)
    except ValueError as exc:
        log.warning("ignoring client record: %s", exc)
        return None
    return None if record.expired(now, max_age) else record


# ---------------------------------------------------------------------------
# postscreen's cache

POSTSCREEN_TESTS = ("pregreet", "dnsbl", "pipelining", "non_smtp", "bare_newline")
_NEVER_PASSED = 0  # PSC_TIME_STAMP_NEW
_DISABLED = 1  # PSC_TIME_STAMP_DISABLED


@dataclass(frozen=True)
class PostscreenEntry:
    """The expiry time of each test, in POSTSCREEN_TESTS order."""

    expiry: tuple[int, ...]

    @classmethod
    def parse(cls, value: str) -> PostscreenEntry:
        """ValueError unless ``value`` is ``;``-separated decimal times.

        Like postscreen, an entry with fewer fields (an older postscreen)
        counts the missing tests as disabled; fields beyond the five known
        tests are ignored.
        """
        if not value or len(value) > limits.POSTSCREEN_VALUE_MAX_CHARS:
            raise ValueError(f"malformed postscreen cache value {value[:80]!r}")
        fields = value.split(";")
        if not all(f.isascii() and f.isdigit() for f in fields):
            raise ValueError(f"malformed postscreen cache value {value[:80]!r}")
        times = [int(f) for f in fields[: len(POSTSCREEN_TESTS)]]
        times += [_DISABLED] * (len(POSTSCREEN_TESTS) - len(times))
        return cls(tuple(times))

    def verified(self, now: float) -> bool:
        """Every enabled test passed and has not expired, and at least one
        test is enabled.  postscreen redoes a test when now > its expiry."""
        enabled = [t for t in self.expiry if t != _DISABLED]
        return bool(enabled) and all(t != _NEVER_PASSED and now <= t for t in enabled)


def postscreen_verified(value: str | None, now: float, client: str = "") -> bool:
    """True when postscreen's cache ``value`` shows a verified client;
    absent or malformed values (logged) are not verified."""
    if value is None:
        return False
    try:
        return PostscreenEntry.parse(value).verified(now)
    except ValueError as exc:
        log.warning("ignoring postscreen cache entry for %s: %s", client or "client", exc)
        return False

"""What policyd knows about a client beyond one triplet.

A client record counts greylisting outcomes per client key; after
``auto_whitelist_clients`` passes (counted at most once per hour, as
postgrey's --auto-whitelist-clients) the client skips greylisting.  The
postscreen part reads Postfix postscreen's cache: an entry whose after-220
test passed shows that the client came back after postscreen's 4xx, which is
what greylisting would check again (docs/design.md has the reasoning).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from policyd import limits

log = logging.getLogger(__name__)

# Greylisting rules of records: passes of a client are counted at most once
# per PASS_COUNT_INTERVAL seconds (postgrey counts auto-whitelist passes once
# per hour), and a passed triplet's or a client's last_seen (and so its ttl)
# is rewritten at most once per RECORD_REFRESH_INTERVAL, to save writes.
PASS_COUNT_INTERVAL = 3600
RECORD_REFRESH_INTERVAL = 3600


def needs_refresh(last_seen: int, now: int) -> bool:
    """Whether a record last seen at ``last_seen`` is due to be rewritten
    (a last_seen in the future, from a clock that went back, is too)."""
    return not 0 <= now - last_seen < RECORD_REFRESH_INTERVAL

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
        if (self.last_pass == 0 or now >= self.last_pass + PASS_COUNT_INTERVAL
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
        return needs_refresh(self.last_seen, now)


R = TypeVar("R")


def parse_record(value: str | None, parse: Callable[[str], R], kind: str) -> R | None:
    """A stored record of ``kind`` as ``parse`` reads it; None when absent
    or malformed (logged: the record then counts as new)."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        log.warning("ignoring %s record: %s", kind, exc)
        return None


def load_client_record(value: str | None, now: int, max_age: int) -> ClientRecord | None:
    """The stored record, or None when absent, older than max_age (a backup
    table may not expire entries) or malformed (logged)."""
    record = parse_record(value, ClientRecord.parse, "client")
    return None if record is None or record.expired(now, max_age) else record


# ---------------------------------------------------------------------------
# postscreen's cache (Postfix src/postscreen/postscreen_tests.c)

POSTSCREEN_TESTS = ("pregreet", "dnsbl", "pipelining", "non_smtp", "bare_newline")
_DNSBL = POSTSCREEN_TESTS.index("dnsbl")
# The after-220 ("deep protocol") tests.  postscreen runs them in its own
# SMTP engine, which rejects every RCPT (450 4.3.2) and never hands the
# session to smtpd: whoever passed one had to connect again to deliver mail.
_AFTER_220 = tuple(POSTSCREEN_TESTS.index(t) for t in ("pipelining", "non_smtp", "bare_newline"))
_DISABLED = 1  # PSC_TIME_STAMP_DISABLED; 0 is PSC_TIME_STAMP_NEW, never passed


@dataclass(frozen=True)
class PostscreenEntry:
    """The expiry time of each test, in POSTSCREEN_TESTS order: 0 never
    passed, 1 disabled when the entry was written, else passed until then."""

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

    def proves_return(self, now: float) -> bool:
        """True when an after-220 test passed and has not expired (postscreen
        redoes a test once now > its expiry), so the client now talking to
        smtpd came back after postscreen's 450.

        Pregreet and DNSBL never count: they pass in the very session that
        postscreen then hands to smtpd.  Nor does an after-220 time that is
        not later than the DNSBL time: that is what
        postscreen_dnsbl_allowlist_threshold writes into every test, unrun,
        when a DNS allowlist vouches for the client.
        """
        dnsbl = self.expiry[_DNSBL]
        return any(t > _DISABLED and now <= t and t > dnsbl
                   for t in (self.expiry[i] for i in _AFTER_220))


def postscreen_proves_return(value: str | None, now: float, client: str = "") -> bool:
    """True when postscreen's cache ``value`` shows that the client came back
    after an after-220 test (PostscreenEntry.proves_return); absent or
    malformed values (logged) prove nothing."""
    if value is None:
        return False
    try:
        return PostscreenEntry.parse(value).proves_return(now)
    except ValueError as exc:
        log.warning("ignoring postscreen cache entry for %s: %s", client or "client", exc)
        return False

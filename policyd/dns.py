"""Asynchronous DNS for policyd: one resolver on the event loop, every
query bounded in time, answers cached for their DNS TTL in a bounded cache.

Everything DNS-aware in policyd (DNSBL/DNSWL scores, SPF) asks through
``Resolver.query``, which never raises for a DNS outcome: a name that does
not exist, a name without records of the type, and a failure (timeout,
SERVFAIL, REFUSED, a malformed name) are answers of their own, so callers
decide what "unknown" means.  dnspython's asyncio resolver does the wire
work (see pyproject.toml for why dnspython).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from memtable import clock
from policyd import limits

# The record types policyd asks for, and how each becomes text.
RDTYPES = ("A", "AAAA", "TXT", "MX", "PTR")


class Status(enum.Enum):
    """The outcome of one query."""

    OK = "ok"               # records of the type exist (``records`` holds them)
    NXDOMAIN = "nxdomain"   # the name does not exist
    NODATA = "nodata"       # the name exists, without records of the type
    FAILURE = "failure"     # no answer: timeout, SERVFAIL, REFUSED, bad name


@dataclass(frozen=True)
class Answer:
    """One query's outcome.  ``records`` as text: A/AAAA addresses; TXT
    strings of one record joined without separator (RFC 7208 3.3); MX
    exchanges, most preferred first; PTR targets; names without the
    trailing dot.  ``reason`` says why for FAILURE (for logs)."""

    status: Status
    records: tuple[str, ...] = ()
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def failed(self) -> bool:
        return self.status is Status.FAILURE


def _text(rdtype: str, rrset: Sequence[object]) -> tuple[str, ...]:
    if rdtype in ("A", "AAAA"):
        return tuple(r.address for r in rrset)  # type: ignore[attr-defined]
    if rdtype == "TXT":
        # Bytes as they are: latin-1 maps each byte to one character, so
        # SPF's ASCII syntax checks see every byte (UTF-8 is not SPF).
        return tuple(b"".join(r.strings).decode("latin-1") for r in rrset)  # type: ignore[attr-defined]
    if rdtype == "MX":
        ordered = sorted(rrset, key=lambda r: r.preference)  # type: ignore[attr-defined]
        return tuple(r.exchange.to_text(omit_final_dot=True) for r in ordered)  # type: ignore[attr-defined]
    if rdtype == "PTR":
        return tuple(r.target.to_text(omit_final_dot=True) for r in rrset)  # type: ignore[attr-defined]
    raise ValueError(f"unsupported record type {rdtype}")


class FailureWarnings:
    """Warnings about DNS failures, at most one per DNS_WARN_INTERVAL_SECONDS
    for each subject (a DNS list's domain, lower case; "SPF"): every
    decision line says ``dns=timeout`` already, the warning only says what
    is failing.  Subjects must be few (they are remembered)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}  # subject -> when it was last logged

    def warn(self, logger: logging.Logger, subject: str, message: str,
             *args: object) -> bool:
        """Log ``message % args`` as a warning unless ``subject`` was logged
        within the interval; True when it was logged."""
        now = clock.monotonic()
        last = self._last.get(subject)
        if last is not None and now - last < limits.DNS_WARN_INTERVAL_SECONDS:
            return False
        self._last[subject] = now
        logger.warning(message, *args)
        return True


class Resolver:
    """Bounded, cached DNS queries on the running event loop.

    ``servers``: (address, port) pairs; ``None`` reads the system's
    resolv.conf.  ``timeout`` bounds each query as a whole (all servers and
    retries).  ``cache_entries`` bounds the cache (least recently used out).

    Answers are kept as policyd's Answer under their text name, until
    dnspython's own expiration for them (the DNS TTL; for "no such name"
    and "no data" the SOA's negative TTL): a cached answer then costs a
    dict lookup (``cached``), not dnspython's name parsing and resolution
    steps, which cost more than a whole greylisting decision, and a few
    hundred bytes, not the whole response dnspython's cache keeps (that
    one stays small: DNS_LIBRARY_CACHE_ENTRIES).  A FAILURE is kept too, for
    DNS_FAILURE_CACHE_SECONDS (RFC 2308 section 7): during an outage each
    name costs one ``timeout`` per interval, not one per request.
    """

    def __init__(self, servers: Sequence[tuple[str, int]] | None = None, *,
                 timeout: float = limits.DNS_TIMEOUT_DEFAULT_SECONDS,
                 cache_entries: int = limits.DNS_CACHE_MAX_ENTRIES) -> None:
        resolver = dns.asyncresolver.Resolver(configure=servers is None)
        if servers is not None:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                    for host, port in servers]
        resolver.lifetime = timeout
        resolver.timeout = timeout
        resolver.cache = dns.resolver.LRUCache(limits.DNS_LIBRARY_CACHE_ENTRIES)
        self._resolver = resolver
        self.timeout = timeout
        self._answers: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._max_answers = cache_entries
        # One limiter for every DNS user of this resolver (lists, SPF).
        self.warnings = FailureWarnings()

    def cached(self, name: str, rdtype: str) -> Answer | None:
        """The answer while it is cached, without asking; None otherwise."""
        key = (name, rdtype)
        item = self._answers.get(key)
        if item is None:
            return None
        if clock.now() >= item[0]:
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        return item[1]

    def _keep(self, name: str, rdtype: str, answer: Answer, expiration: float) -> Answer:
        self._answers[(name, rdtype)] = (expiration, answer)
        if len(self._answers) > self._max_answers:
            self._answers.popitem(last=False)
        return answer

    def _failed(self, name: str, rdtype: str, reason: str) -> Answer:
        """A failure, kept briefly (dnspython's cache keeps no failures)."""
        return self._keep(name, rdtype, Answer(Status.FAILURE, reason=reason),
                          clock.now() + limits.DNS_FAILURE_CACHE_SECONDS)

    async def query(self, name: str, rdtype: str) -> Answer:
        """Ask for ``rdtype`` records of ``name``; never raises for a DNS
        outcome, never waits longer than ``timeout``."""
        if rdtype not in RDTYPES:
            raise ValueError(f"unsupported record type {rdtype}")
        known = self.cached(name, rdtype)
        if known is not None:
            return known
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError, UnicodeError) as e:
            return Answer(Status.FAILURE, reason=f"bad name: {e}")
        try:
            # The resolver's lifetime bounds it already; asyncio's own
            # timeout makes the bound hold whatever the library does.
            async with asyncio.timeout(self.timeout + limits.DNS_TIMEOUT_SLACK_SECONDS):
                answer = await self._resolver.resolve(
                    qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            # dnspython keeps a "no such name" under type ANY, with its expiration.
            negative = self._resolver.cache.get(
                (qname, dns.rdatatype.ANY, dns.rdataclass.IN))
            if negative is None:
                return Answer(Status.NXDOMAIN)
            return self._keep(name, rdtype, Answer(Status.NXDOMAIN), negative.expiration)
        except (dns.exception.Timeout, TimeoutError):
            return self._failed(name, rdtype, "timeout")
        except dns.resolver.NoNameservers as e:
            return self._failed(name, rdtype, f"no server answered: {e}")
        except (dns.exception.DNSException, OSError, ValueError) as e:
            return self._failed(name, rdtype, f"{type(e).__name__}: {e}")
        if answer.rrset is None:
            return self._keep(name, rdtype, Answer(Status.NODATA), answer.expiration)
        records = _text(rdtype, list(answer.rrset))
        if len(records) > limits.DNS_MAX_RECORDS:
            records = records[:limits.DNS_MAX_RECORDS]
        return self._keep(name, rdtype, Answer(Status.OK, records), answer.expiration)

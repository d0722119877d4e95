"""DNSBL/DNSWL scores in postscreen's own terms.

``dnsbl_sites`` takes postscreen_dnsbl_sites' syntax, read from Postfix's
source (postscreen_dnsbl.c, ip_match.c, valid_hostname.c):

    zen.spamhaus.org*3, b.barracudacentral.org*2, list.dnswl.org=127.0.[0..255].[1..3]*-2

Each item is ``domain[=filter][*weight]``, split at the first ``*`` and
then at the first ``=``.  The weight is an integer (default 1; negative
for allowlists).  The filter is four dot-separated fields, each a number
0..255 or ``[...]`` holding ``;``-separated numbers and ``a..b`` ranges;
brackets around the whole filter are allowed.  A domain may be named more
than once (each item scores on its own) and is queried once per request.

The score is postscreen's sum: the client's reversed address (IPv4
octets, or IPv6's 32 nibbles as dnsblog does) is looked up as an A record
under each domain, and each item whose filter matches at least one of the
answer's addresses (any address when there is no filter) adds its weight
once.  One difference: postscreen counts a list that does not answer as
"not listed", policyd counts the whole score as unknown (the request is
greylisted as without DNS), because a DNSWL that times out must not make
its clients look like strangers that skip nothing, nor a DNSBL outage make
spammers look clean.

Parsing is pure (text in, frozen dataclasses out, ValueError with
Postfix's wording); scoring asks every domain at once on the Resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from memtable.cf import decimal
from policyd import limits
from policyd.dns import Answer, Resolver

log = logging.getLogger(__name__)

# Outcomes of a score against the thresholds (decision reasons and metrics).
DNSWL = "dnswl"          # score <= dnsbl_allowlist_threshold (< 0): not greylisted
UNLISTED = "unlisted"    # score < dnsbl_greylist_threshold: not greylisted
LISTED = "listed"        # score >= dnsbl_greylist_threshold: greylist_delay_listed
NEUTRAL = "neutral"      # greylisted as without DNS
UNKNOWN = "unknown"      # a list did not answer: greylisted as without DNS

# The longest domain that leaves room for an IPv6 client's 64-character
# reversed prefix in a 253-character DNS name (Postfix allows 255, which
# would make every IPv6 query fail).
_IPV6_PREFIX_CHARS = 64
DOMAIN_MAX_CHARS = 253 - _IPV6_PREFIX_CHARS
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}", re.ASCII)
_WEIGHT = re.compile(r"[+-]?[0-9]+", re.ASCII)


@dataclass(frozen=True)
class AddressFilter:
    """An ip_match(3) IPv4 pattern: per octet, the (low, high) ranges it allows."""

    octets: tuple[tuple[tuple[int, int], ...], ...]

    def matches(self, address: str) -> bool:
        """Does the A record ``address`` (dotted quad) match?"""
        try:
            values = ipaddress.IPv4Address(address).packed
        except ValueError:
            return False
        return all(any(low <= value <= high for low, high in ranges)
                   for value, ranges in zip(values, self.octets, strict=True))

    def __str__(self) -> str:
        fields = []
        for ranges in self.octets:
            if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                fields.append(str(ranges[0][0]))
            else:
                fields.append("[" + ";".join(str(lo) if lo == hi else f"{lo}..{hi}"
                                             for lo, hi in ranges) + "]")
        return ".".join(fields)


@dataclass(frozen=True)
class DnsblSite:
    """One ``domain[=filter][*weight]`` item of dnsbl_sites."""

    domain: str
    filter: AddressFilter | None = None
    weight: int = 1

    def __str__(self) -> str:
        text = self.domain
        if self.filter is not None:
            text += f"={self.filter}"
        if self.weight != 1:
            text += f"*{self.weight}"
        return text


# --- parsing -------------------------------------------------------------------


class _Tokens:
    """ip_match.c's tokenizer: a decimal number (an error above 255) or one
    character; errors show the input with ``>here<`` around the token."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.start = 0

    def next(self) -> tuple[str, int]:
        """("N", value), ("E", 0) for a number over 255, (char, 0), ("", 0) at the end."""
        self.start = pos = self.pos
        text = self.text
        if pos < len(text) and text[pos] in "0123456789":
            end = pos
            while end < len(text) and text[end] in "0123456789":
                end += 1
            self.pos = end
            value = decimal(text[pos:end])  # None: too many digits, over 255 too
            return ("N", value) if value is not None and value <= 255 else ("E", 0)
        if pos < len(text):
            self.pos = pos + 1
            return text[pos], 0
        return "", 0

    def error(self, message: str) -> ValueError:
        t = self.text
        return ValueError(f'{message} at "{t[:self.start]}>{t[self.start:self.pos]}<'
                          f'{t[self.pos:]}"')


def parse_filter(pattern: str) -> AddressFilter:
    """An ip_match(3) pattern; ValueError with ip_match_parse's message."""
    if pattern.startswith("["):
        # Brackets around the whole pattern are dropped (ip_match.c).
        level, end = 0, -1
        for i, char in enumerate(pattern):
            if char == "[":
                level += 1
            elif char == "]":
                level -= 1
                if level == 0:
                    end = i
                    break
        if end < 0:
            raise ValueError('missing "]" character')
        if end == len(pattern) - 1:
            pattern = pattern[1:-1]
    if not pattern:
        raise ValueError("empty address pattern")
    tokens = _Tokens(pattern)
    octets: list[tuple[tuple[int, int], ...]] = []
    while True:
        kind, value = tokens.next()
        if kind == "N":
            octets.append(((value, value),))
        elif kind == "[":
            octets.append(_sequence(tokens))
        else:
            raise tokens.error('need decimal number 0..255 or "["')
        if len(octets) == 4:
            if tokens.pos < len(pattern):
                tokens.next()
                raise tokens.error("garbage after pattern")
            return AddressFilter(tuple(octets))
        if tokens.next()[0] != ".":
            raise tokens.error('need "."')


def _sequence(tokens: _Tokens) -> tuple[tuple[int, int], ...]:
    """The inside of ``[...]``: numbers and ranges separated by ``;``."""
    ranges: list[tuple[int, int]] = []
    while True:
        kind, low = tokens.next()
        if kind != "N":
            raise tokens.error("need decimal number 0..255")
        ahead = tokens.next()[0]
        high = low
        if ahead == ".":
            if tokens.next()[0] != ".":
                raise tokens.error("numeric range error")
            kind, high = tokens.next()
            if kind != "N" or high < low:
                raise tokens.error("numeric range error")
            ahead = tokens.next()[0]
        ranges.append((low, high))
        if ahead == ";":
            continue
        if ahead == "]":
            return tuple(ranges)
        raise tokens.error('need ";" or "]"')


def _check_domain(domain: str, site: str) -> None:
    """valid_hostname(3): labels of letters, digits, ``_`` and inner ``-``,
    not all numeric; and short enough for an IPv6 query (see DOMAIN_MAX_CHARS)."""
    labels = domain.split(".")
    if (not domain or not all(_LABEL.fullmatch(label) and label[0] != "-"
                              and label[-1] != "-" for label in labels)
            or domain.replace(".", "").isdigit()):
        raise ValueError(f'bad DNSBL domain name "{domain}" in "{site}"')
    if len(domain) > DOMAIN_MAX_CHARS:
        raise ValueError(f'DNSBL domain name "{domain[:40]}..." in "{site[:40]}...": '
                         f"longer than {DOMAIN_MAX_CHARS} characters")


def parse_site(site: str) -> DnsblSite:
    """One ``domain[=filter][*weight]`` item (postscreen_dnsbl.c's order:
    split at the first ``*``, then at the first ``=``)."""
    rest, star, weight_text = site.partition("*")
    weight = 1
    if star:
        if not _WEIGHT.fullmatch(weight_text):
            raise ValueError(f'bad DNSBL weight factor "{weight_text}" in "{site}"')
        number = decimal(weight_text)  # None: too many digits, beyond the bound too
        weight = number if number is not None else limits.DNSBL_MAX_WEIGHT + 1
        if abs(weight) > limits.DNSBL_MAX_WEIGHT:
            raise ValueError(f'DNSBL weight factor "{weight_text}" in "{site}": '
                             f"beyond +-{limits.DNSBL_MAX_WEIGHT}")
    domain, equals, pattern = rest.partition("=")
    address_filter = None
    if equals:
        try:
            address_filter = parse_filter(pattern)
        except ValueError as exc:
            raise ValueError(f"bad DNSBL filter syntax: {exc}") from None
    _check_domain(domain, site)
    return DnsblSite(domain.lower(), address_filter, weight)


def parse_sites(items: Sequence[str]) -> tuple[DnsblSite, ...]:
    """Every item of dnsbl_sites (already split at commas and white space)."""
    if len(items) > limits.DNSBL_MAX_SITES:
        raise ValueError(f"more than {limits.DNSBL_MAX_SITES} DNSBL sites")
    return tuple(parse_site(item) for item in items)


# --- scoring -------------------------------------------------------------------


def reversed_prefix(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The query prefix for ``ip``, as dnsblog builds it: ``4.3.2.1.`` for
    1.2.3.4; for IPv6 the 32 nibbles of the address, last first."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split("."))) + "."
    return ".".join(reversed(ip.packed.hex())) + "."


@dataclass(frozen=True)
class DnsScore:
    """A client's score: ``value`` None when a list did not answer, then
    ``failure`` says how (``timeout`` or ``failure``)."""

    value: int | None
    failure: str | None = None


@dataclass(frozen=True)
class DnsVerdict:
    """A score judged against the thresholds (see the module constants)."""

    score: DnsScore
    outcome: str


class DnsblScorer:
    """The sites of dnsbl_sites grouped by domain, scored on a Resolver."""

    def __init__(self, sites: Sequence[DnsblSite], resolver: Resolver, *,
                 allowlist_threshold: int = 0,
                 greylist_threshold: int | None = None) -> None:
        self.resolver = resolver
        by_domain: dict[str, list[DnsblSite]] = {}
        for site in sites:
            by_domain.setdefault(site.domain, []).append(site)
        self._by_domain = tuple((domain, tuple(items)) for domain, items in by_domain.items())
        self.allowlist_threshold = allowlist_threshold
        self.greylist_threshold = greylist_threshold

    async def score(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> DnsScore:
        """Ask every domain at once; at most the resolver's timeout."""
        prefix = reversed_prefix(ip)
        names = [prefix + domain for domain, _ in self._by_domain]
        # Cached answers at once (no task, no event loop step); the rest
        # asked together.
        answers = [self.resolver.cached(name, "A") for name in names]
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if len(missing) == 1:
            answers[missing[0]] = await self.resolver.query(names[missing[0]], "A")
        elif missing:
            asked = await asyncio.gather(*(self.resolver.query(names[i], "A") for i in missing))
            for i, got in zip(missing, asked, strict=True):
                answers[i] = got
        total = 0
        failure = None
        for (domain, sites), answer in zip(self._by_domain, answers, strict=True):
            assert answer is not None
            if answer.failed:
                self._warn(domain, answer)
                # A timeout is the outcome an operator must hear about first.
                failure = "timeout" if answer.reason == "timeout" or failure == "timeout" \
                    else "failure"
            elif answer.ok:
                for site in sites:
                    if site.filter is None or any(map(site.filter.matches, answer.records)):
                        total += site.weight
        return DnsScore(None, failure) if failure else DnsScore(total)

    def _warn(self, domain: str, answer: Answer) -> None:
        """Which list failed, at most once per DNS_WARN_INTERVAL_SECONDS
        each (every decision line says dns=timeout already)."""
        self.resolver.warnings.warn(
            log, domain, "DNS list %s did not answer (%s): scores are unknown, clients are "
            "greylisted as without DNS", domain, answer.reason)

    def judge(self, score: DnsScore) -> DnsVerdict:
        """postscreen's allowlist rule (a negative threshold, score at or
        below it), then dnsbl_greylist_threshold when it is set."""
        value = score.value
        if value is None:
            return DnsVerdict(score, UNKNOWN)
        if self.allowlist_threshold < 0 and value <= self.allowlist_threshold:
            return DnsVerdict(score, DNSWL)
        if self.greylist_threshold is not None:
            return DnsVerdict(score, LISTED if value >= self.greylist_threshold else UNLISTED)
        return DnsVerdict(score, NEUTRAL)

    async def verdict(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> DnsVerdict:
        return self.judge(await self.score(ip))

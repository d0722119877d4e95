"""SPF (RFC 7208) check_host() on policyd's asyncio resolver.

``check(resolver, ip, sender, helo)`` evaluates the sender domain's SPF
policy for the client address at RCPT time: the MAIL FROM domain, or the
HELO name for the null sender (RFC 7208 2.4).  It follows RFC 7208 as far as
a decision needs: the whole record is checked for syntax before evaluation
(4.6), at most SPF_MAX_DNS_TERMS terms that cause DNS queries (4.6.4), at
most SPF_MAX_VOID_LOOKUPS void lookups, at most SPF_MAX_MX_NAMES MX names per
``mx`` (more: permerror) and SPF_MAX_PTR_NAMES PTR names per ``ptr`` or
``%{p}`` (more: ignored), macros with transformers and delimiters (7), and
the results none, neutral, pass, fail, softfail, temperror and permerror.
``exp=`` is checked for syntax but never fetched: an explanation is for a
rejection text, never part of the decision.  The whole evaluation is bounded
in time (the caller's ``timeout``); past it the result is temperror.

The result also says which mechanism matched and, for a pass, whether that
mechanism names the sender's own servers or "too much" (``broad``): a pass
through ``all``, an ``ip4``/``a``/``mx`` network wider than a /16 (IPv6: a
/48), ``exists``, or a domain-spec built from macros the client controls
(%{i}, %{s}, %{l}, %{h}, %{p}: a DNS server of the sender's domain can answer
"yes" to every address) proves nothing about the client, since a spammer's
own domain can publish it.  policyd pools clients under the sender domain
only for a pass that is not broad.

Voids are counted per term (a term whose own query answers NXDOMAIN or no
records), as RFC 7208 4.6.4 words it; the address lookups of ``mx`` and
``ptr`` names are bounded by the per-name limits instead.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

from policyd import limits
from policyd.dns import Answer, Resolver, Status

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NONE, NEUTRAL, PASS, FAIL, SOFTFAIL = "none", "neutral", "pass", "fail", "softfail"
TEMPERROR, PERMERROR = "temperror", "permerror"
RESULTS = (NONE, NEUTRAL, PASS, FAIL, SOFTFAIL, TEMPERROR, PERMERROR)
_QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}

# --- syntax (RFC 7208 12, the collected ABNF) --------------------------------
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)", re.DOTALL)
_MECHANISM = re.compile(r"([-+~?]?)([A-Za-z][A-Za-z0-9_.\-]*)(.*)", re.DOTALL)
_MACRO = re.compile(r"%\{([slodiphcrtvSLODIPHCRTV])([0-9]*)([rR]?)([.\-+,/_=]*)\}|%[%_-]")
_LITERAL = re.compile(r"[\x21-\x24\x26-\x7e]+")
_TOPLABEL_END = re.compile(
    r"\.(?:[0-9A-Za-z]*[A-Za-z][0-9A-Za-z]*|[0-9A-Za-z]+-[0-9A-Za-z\-]*[0-9A-Za-z])\.?\Z")
_CIDR6 = re.compile(r"//(0|[1-9][0-9]*)\Z")
_CIDR4 = re.compile(r"/(0|[1-9][0-9]*)\Z")
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf"{_QNUM}(?:\.{_QNUM}){{3}}\Z")
_IP6_CHARS = re.compile(r"[0-9A-Fa-f:.]+\Z")
_SPF_VERSION = re.compile(r"v=spf1(?: |\Z)", re.IGNORECASE)
_LDH_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]*[A-Za-z0-9_])?\Z")
# Macro letters whose value does not come from the client (the domains the
# policy is about, the address family): a domain-spec with only these names
# a fixed set of hosts.
_FIXED_MACROS = frozenset("dov")
_EXP_ONLY_MACROS = frozenset("crt")
_DNS_MECHANISMS = frozenset({"a", "mx", "ptr", "exists", "include"})


class _PermError(Exception):
    pass


class _TempError(Exception):
    def __init__(self, message: str, dns: str) -> None:
        super().__init__(message)
        self.dns = dns


@dataclass(frozen=True)
class SpfResult:
    """One check_host() outcome.

    ``domain``: the domain checked; ``mechanism``: the term that matched as
    written (innermost, through include and redirect; "" when none did);
    ``broad``: for a pass, why it does not identify the sender's own servers
    ("" when it does); ``reason``: why, for temperror and permerror; ``dns``:
    "timeout" or "failure" when a DNS failure made the result temperror."""

    result: str
    domain: str
    mechanism: str = ""
    broad: str = ""
    reason: str = ""
    dns: str = ""

    @property
    def pooled(self) -> bool:
        """A pass that names the client as one of the sender's own servers."""
        return self.result == PASS and not self.broad


@dataclass(frozen=True)
class _Term:
    text: str
    kind: str               # mechanism name or "redirect"
    qualifier: str = PASS
    spec: str | None = None  # domain-spec (None: the current domain)
    network: int = 0         # ip4/ip6 address, as a number
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Match:
    term: str
    broad: str


@dataclass
class _State:
    lookups: int = 0
    voids: int = 0
    ptr_names: tuple[str, ...] | None = None  # validated names, once known
    p_macro: dict[str, str] = field(default_factory=dict)


def _split_macro_string(text: str) -> list[tuple[str, re.Match[str] | None]]:
    """Literal and macro tokens of a macro-string; _PermError if malformed."""
    tokens: list[tuple[str, re.Match[str] | None]] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "%":
            match = _MACRO.match(text, pos)
            if match is None:
                raise _PermError(f"bad macro in {text!r}")
            tokens.append((match[0], match))
            pos = match.end()
            continue
        literal = _LITERAL.match(text, pos)
        if literal is None:
            raise _PermError(f"bad character in {text!r}")
        tokens.append((literal[0], None))
        pos = literal.end()
    return tokens


def _digits(text: str) -> int:
    """A transformer's number (any length: a huge one keeps every part)."""
    text = text.lstrip("0")
    if not text:
        return 0
    return int(text) if len(text) <= 4 else 10_000


def _check_macro_string(text: str, *, domain: bool) -> None:
    """Syntax of a macro-string; a domain-spec must also end in a macro or
    a top label, and may not use the exp-only macros (RFC 7208 7.1)."""
    tokens = _split_macro_string(text)
    for _, macro in tokens:
        if macro is not None and macro.lastindex and macro[1].lower() in _EXP_ONLY_MACROS:
            raise _PermError(f"%{{{macro[1]}}} is allowed in exp text only")
        if macro is not None and macro.lastindex and macro[2] and _digits(macro[2]) == 0:
            raise _PermError(f"zero transformer in {text!r}")
    if not domain:
        return
    if not tokens:
        raise _PermError("empty domain-spec")
    if tokens[-1][1] is not None:
        return
    if _TOPLABEL_END.search(tokens[-1][0]) is None:
        raise _PermError(f"{text!r} does not end in a domain name")


def _fixed(spec: str | None) -> bool:
    """Does the domain-spec name the same hosts whatever the client sends?"""
    if spec is None or "%" not in spec:
        return True
    return all(m is None or not m.lastindex or m[1].lower() in _FIXED_MACROS
               for _, m in _split_macro_string(spec))


def _parse_term(text: str) -> _Term:
    modifier = _MODIFIER.fullmatch(text)
    if modifier is not None:
        name, value = modifier[1].lower(), modifier[2]
        if name in ("redirect", "exp"):
            _check_macro_string(value, domain=True)
            return _Term(text, name, spec=value)
        _check_macro_string(value, domain=False)
        return _Term(text, "unknown-modifier")
    mechanism = _MECHANISM.fullmatch(text)
    if mechanism is None:
        raise _PermError(f"unknown term {text!r}")
    qualifier = _QUALIFIERS.get(mechanism[1], PASS)
    name, rest = mechanism[2].lower(), mechanism[3]
    if name == "all":
        if rest:
            raise _PermError(f"unknown term {text!r}")
        return _Term(text, name, qualifier)
    if name in ("ip4", "ip6"):
        return _parse_ip(text, name, qualifier, rest)
    if name not in _DNS_MECHANISMS:
        raise _PermError(f"unknown mechanism {text!r}")
    cidr4, cidr6 = 32, 128
    if name in ("a", "mx"):
        if (m := _CIDR6.search(rest)) is not None:
            cidr6, rest = int(m[1]), rest[:m.start()]
        if (m := _CIDR4.search(rest)) is not None:
            cidr4, rest = int(m[1]), rest[:m.start()]
        if cidr4 > 32 or cidr6 > 128:
            raise _PermError(f"bad cidr-length in {text!r}")
    spec: str | None = None
    if rest:
        if not rest.startswith(":"):
            raise _PermError(f"unknown term {text!r}")
        spec = rest[1:]
        _check_macro_string(spec, domain=True)
    elif name in ("include", "exists"):
        raise _PermError(f"{name} needs a domain: {text!r}")
    return _Term(text, name, qualifier, spec=spec, cidr4=cidr4, cidr6=cidr6)


def _parse_ip(text: str, name: str, qualifier: str, rest: str) -> _Term:
    if not rest.startswith(":"):
        raise _PermError(f"{name} needs a network: {text!r}")
    network, prefix = rest[1:], None
    if (m := _CIDR4.search(network)) is not None:
        network, prefix = network[:m.start()], int(m[1])
    if name == "ip4":
        if _IP4.match(network) is None or (prefix is not None and prefix > 32):
            raise _PermError(f"bad ip4 network {text!r}")
        return _Term(text, name, qualifier, network=int(ipaddress.IPv4Address(network)),
                     cidr4=32 if prefix is None else prefix)
    if _IP6_CHARS.match(network) is None or (prefix is not None and prefix > 128):
        raise _PermError(f"bad ip6 network {text!r}")
    try:
        address = ipaddress.IPv6Address(network)
    except ValueError:
        raise _PermError(f"bad ip6 network {text!r}") from None
    return _Term(text, name, qualifier, network=int(address),
                 cidr6=128 if prefix is None else prefix)


def parse_record(record: str) -> tuple[_Term, ...]:
    """The terms of an SPF record (after ``v=spf1``); _PermError for any
    syntax error anywhere (RFC 7208 4.6: nothing is evaluated then)."""
    if len(record) > limits.SPF_PARSED_RECORD_MAX_CHARS:
        parsed = _parse_cached.__wrapped__(record)
    else:
        parsed = _parse_cached(record)
    if isinstance(parsed, str):
        raise _PermError(parsed)
    return parsed


@functools.lru_cache(maxsize=limits.SPF_PARSED_RECORDS)
def _parse_cached(record: str) -> tuple[_Term, ...] | str:
    """The terms, or the syntax error: the same few records come back with
    every message from a domain, and parsing costs more than a cached DNS
    answer."""
    try:
        if any(ord(ch) > 0x7E for ch in record):
            raise _PermError("non-ASCII character in the record")
        terms = tuple(_parse_term(text) for text in record.split(" ")[1:] if text)
        for name in ("redirect", "exp"):
            if sum(1 for t in terms if t.kind == name) > 1:
                raise _PermError(f"{name}= more than once")
    except _PermError as exc:
        return str(exc)
    return terms


def valid_domain(name: str) -> bool:
    """A domain check_host() can start from (RFC 7208 4.3): at least two
    labels, each of letters, digits, '-' and '_', of 1 to 63 characters."""
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    return (len(name) <= 253 and len(labels) >= 2
            and all(len(label) <= 63 and _LDH_LABEL.match(label) for label in labels))


def _queryable(name: str) -> bool:
    """A name that can be asked at all (no empty or over-long label)."""
    return bool(name) and len(name) <= 253 and all(0 < len(x) <= 63 for x in name.split("."))


class _Evaluation:
    """The state of one check_host() with its nested includes/redirects."""

    def __init__(self, resolver: Resolver, ip: IPAddress, local: str, sender_domain: str,
                 helo: str) -> None:
        self.resolver = resolver
        self.ip = ip
        self.local = local
        self.sender_domain = sender_domain
        self.helo = helo
        self.state = _State()
        if ip.version == 4:
            self.i, self.v, self.rdtype = str(ip), "in-addr", "A"
        else:
            self.i, self.v, self.rdtype = ".".join(ip.exploded.replace(":", "")), "ip6", "AAAA"

    # --- DNS ------------------------------------------------------------------

    async def _query(self, name: str, rdtype: str) -> Answer:
        answer = await self.resolver.query(name, rdtype)
        if answer.failed:
            dns = "timeout" if answer.reason == "timeout" else "failure"
            raise _TempError(f"{rdtype} {name}: {answer.reason or 'failure'}", dns)
        return answer

    def _count_term(self) -> None:
        self.state.lookups += 1
        if self.state.lookups > limits.SPF_MAX_DNS_TERMS:
            raise _PermError(f"more than {limits.SPF_MAX_DNS_TERMS} DNS-querying terms")

    def _count_void(self, answer: Answer) -> None:
        if answer.status in (Status.NXDOMAIN, Status.NODATA):
            self.state.voids += 1
            if self.state.voids > limits.SPF_MAX_VOID_LOOKUPS:
                raise _PermError(f"more than {limits.SPF_MAX_VOID_LOOKUPS} void lookups")

    async def _term_query(self, name: str, rdtype: str) -> Answer:
        """A term's own query: a malformed name is a void answer (nothing is
        asked), a void answer counts toward the void limit."""
        if not _queryable(name):
            answer = Answer(Status.NXDOMAIN)
        else:
            answer = await self._query(name, rdtype)
        self._count_void(answer)
        return answer

    # --- macros (RFC 7208 7) ----------------------------------------------------

    async def expand(self, spec: str, domain: str) -> str:
        """A domain-spec expanded to a name (trailing dot removed, shortened
        from the left to 253 characters)."""
        out: list[str] = []
        for text, macro in _split_macro_string(spec):
            if macro is None:
                out.append(text)
            elif text == "%%":
                out.append("%")
            elif text == "%_":
                out.append(" ")
            elif text == "%-":
                out.append("%20")
            else:
                out.append(await self._macro(macro, domain))
        name = "".join(out)
        if name.endswith("."):
            name = name[:-1]
        while len(name) > 253 and "." in name:
            name = name.split(".", 1)[1]
        return name

    async def _macro(self, macro: re.Match[str], domain: str) -> str:
        letter = macro[1].lower()
        value = {"s": f"{self.local}@{self.sender_domain}", "l": self.local,
                 "o": self.sender_domain, "d": domain, "i": self.i, "v": self.v,
                 "h": self.helo}.get(letter)
        if value is None:  # "p", the only one left after the syntax check
            value = await self._validated_name(domain)
        parts = re.split("[" + re.escape(macro[4] or ".") + "]", value)
        if macro[3]:
            parts.reverse()
        if macro[2]:
            parts = parts[-min(_digits(macro[2]), len(parts)):]
        result = ".".join(parts)
        if macro[1].isupper():
            result = urllib.parse.quote(result, safe="")
        return result

    async def _validated_names(self) -> tuple[str, ...]:
        """The client's names whose addresses include it (RFC 7208 5.5), at
        most SPF_MAX_PTR_NAMES asked; a DNS error skips a name."""
        if self.state.ptr_names is not None:
            return self.state.ptr_names
        answer = await self.resolver.query(self._reverse_name(), "PTR")
        names = []
        for name in answer.records[:limits.SPF_MAX_PTR_NAMES]:
            if await self._has_address(name):
                names.append(name)
        self.state.ptr_names = tuple(names)
        return self.state.ptr_names

    async def _has_address(self, name: str) -> bool:
        if not _queryable(name):
            return False
        addresses = await self.resolver.query(name, self.rdtype)
        return any(ipaddress.ip_address(a) == self.ip for a in addresses.records)

    def _reverse_name(self) -> str:
        if self.ip.version == 4:
            return ".".join(reversed(str(self.ip).split("."))) + ".in-addr.arpa"
        return ".".join(reversed(self.ip.exploded.replace(":", ""))) + ".ip6.arpa"

    async def _validated_name(self, domain: str) -> str:
        """%{p}: the validated name, preferring ``domain`` and its
        subdomains; "unknown" when there is none or DNS fails (RFC 7208 7.3)."""
        if domain in self.state.p_macro:
            return self.state.p_macro[domain]
        names = await self._validated_names()
        lower = domain.lower()
        chosen = next((n for n in names if n.lower() == lower), None)
        chosen = chosen or next((n for n in names if n.lower().endswith("." + lower)), None)
        value = chosen or (names[0] if names else "unknown")
        self.state.p_macro[domain] = value
        return value

    # --- check_host() -----------------------------------------------------------

    async def record(self, domain: str, *, term: bool) -> str | None:
        """The SPF record of ``domain``, None when it has none (for a term,
        the TXT query counts as the term's void lookup)."""
        if not valid_domain(domain):
            return None
        answer = await self._query(domain, "TXT")
        if term:
            self._count_void(answer)
        records = [r for r in answer.records if _SPF_VERSION.match(r)]
        if len(records) > 1:
            raise _PermError(f"{domain}: more than one SPF record")
        return records[0] if records else None

    async def check_host(self, domain: str, record: str) -> tuple[str, _Match | None]:
        terms = parse_record(record)
        redirect = None
        for term in terms:
            if term.kind == "redirect":
                redirect = term
            if term.kind in ("redirect", "exp", "unknown-modifier"):
                continue
            match = await self._matches(term, domain)
            if match is not None:
                return term.qualifier, match
        if redirect is None or redirect.spec is None:
            return NEUTRAL, None
        self._count_term()
        target = await self.expand(redirect.spec, domain)
        target_record = await self.record(target, term=True)
        if target_record is None:
            raise _PermError(f"redirect={target}: no SPF record")
        result, match = await self.check_host(target, target_record)
        if match is not None and not _fixed(redirect.spec):
            match = _Match(match.term, match.broad or "macro")
        return result, match

    async def _matches(self, term: _Term, domain: str) -> _Match | None:
        """The match when ``term`` matches the client, else None."""
        kind = term.kind
        if kind == "all":
            return _Match(term.text, "all")
        if kind == "ip4" or kind == "ip6":
            if (kind == "ip4") != (self.ip.version == 4):
                return None
            prefix = term.cidr4 if kind == "ip4" else term.cidr6
            if not self._same_network(term.network, prefix):
                return None
            return _Match(term.text, self._wide(prefix))
        self._count_term()
        target = domain if term.spec is None else await self.expand(term.spec, domain)
        broad = "" if _fixed(term.spec) else "macro"
        if kind == "include":
            return await self._include(term, target, broad)
        if kind == "exists":
            answer = await self._term_query(target, "A")
            return _Match(term.text, "exists") if answer.records else None
        if kind == "ptr":
            return _Match(term.text, broad) if await self._ptr(target) else None
        prefix = term.cidr4 if self.ip.version == 4 else term.cidr6
        addresses: Sequence[str]
        if kind == "a":
            addresses = (await self._term_query(target, self.rdtype)).records
        else:
            addresses = await self._mx_addresses(target)
        if any(self._in_network(a, prefix) for a in addresses):
            return _Match(term.text, broad or self._wide(prefix))
        return None

    async def _include(self, term: _Term, target: str, broad: str) -> _Match | None:
        record = await self.record(target, term=True)
        if record is None:
            raise _PermError(f"include:{target}: no SPF record")
        result, match = await self.check_host(target, record)
        if result == PASS and match is not None:
            return _Match(match.term, match.broad or broad)
        return None  # fail, softfail, neutral: no match; errors have raised

    async def _mx_addresses(self, target: str) -> list[str]:
        answer = await self._term_query(target, "MX")
        names = [n for n in answer.records if n not in (".", "")]
        if len(answer.records) > limits.SPF_MAX_MX_NAMES:
            raise _PermError(f"mx:{target}: more than {limits.SPF_MAX_MX_NAMES} MX records")
        addresses: list[str] = []
        for name in names:
            if _queryable(name):
                addresses.extend((await self._query(name, self.rdtype)).records)
        return addresses

    async def _ptr(self, target: str) -> bool:
        """RFC 7208 5.5; a DNS error of the PTR query is no match."""
        target = target.lower()
        if not _queryable(target):
            return False
        reverse = await self.resolver.query(self._reverse_name(), "PTR")
        self._count_void(reverse)
        if not reverse.ok:
            return False
        for name in reverse.records[:limits.SPF_MAX_PTR_NAMES]:
            lower = name.lower()
            # Only names that would match need their addresses checked.
            if (lower == target or lower.endswith("." + target)) and await self._has_address(name):
                return True
        return False

    def _in_network(self, address: str, prefix: int) -> bool:
        try:
            other = ipaddress.ip_address(address)
        except ValueError:
            return False
        return other.version == self.ip.version and self._same_network(int(other), prefix)

    def _same_network(self, other: int, prefix: int) -> bool:
        """Is ``other`` (of the client's family) in the client's /prefix?"""
        shift = self.ip.max_prefixlen - prefix
        return (other >> shift) == (int(self.ip) >> shift)

    def _wide(self, prefix: int) -> str:
        limit = (limits.SPF_POOL_MIN_IPV4_PREFIX if self.ip.version == 4
                 else limits.SPF_POOL_MIN_IPV6_PREFIX)
        return f"/{prefix}" if prefix < limit else ""


def split_sender(sender: str, helo: str) -> tuple[str, str]:
    """(local part, domain) whose policy check_host() evaluates: the MAIL
    FROM address, or postmaster@HELO for the null sender (RFC 7208 2.4);
    an empty local part is "postmaster" (4.3)."""
    sender = sender.strip()
    if sender in ("", "<>"):
        return "postmaster", helo.strip()
    local, at, domain = sender.rpartition("@")
    if not at:
        return "postmaster", ""
    return local or "postmaster", domain


async def check(resolver: Resolver, ip: IPAddress, sender: str, helo: str, *,
                timeout: float) -> SpfResult:
    """check_host() for ``ip`` and the sender's domain, bounded by ``timeout``
    seconds in all; never raises for DNS or record errors."""
    local, domain = split_sender(sender, helo)
    evaluation = _Evaluation(resolver, ip, local, domain, helo.strip())
    try:
        async with asyncio.timeout(timeout):
            record = await evaluation.record(domain, term=False)
            if record is None:
                return SpfResult(NONE, domain)
            result, match = await evaluation.check_host(domain, record)
    except TimeoutError:
        return SpfResult(TEMPERROR, domain, reason="evaluation timed out", dns="timeout")
    except _TempError as exc:
        return SpfResult(TEMPERROR, domain, reason=str(exc), dns=exc.dns)
    except _PermError as exc:
        return SpfResult(PERMERROR, domain, reason=str(exc))
    except Exception as exc:
        # The records come from anyone's DNS: a record that trips a bug
        # here must cost its sender the SPF key, never fail the request
        # (a policy failure answers DUNNO: no greylisting at all).
        log.warning("SPF evaluation for %s failed: %s: %s", domain[:100],
                    type(exc).__name__, exc)
        return SpfResult(PERMERROR, domain, reason=f"internal error: {exc}")
    if match is None:
        return SpfResult(result, domain)
    return SpfResult(result, domain, match.term, match.broad if result == PASS else "")

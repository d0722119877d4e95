"""policyd.spf (RFC 7208 check_host()) against a real DNS server (nsd)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator

import pytest

from policyd import limits
from policyd.dns import Answer, Resolver
from policyd.spf import SpfResult, check, split_sender
from tests.dnslab import Nsd, silent_dns_server, start_nsd

ORG = r"""
@ TXT "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8:1::/48 -all"
plain TXT "v=spf1 ip4:192.0.2.10 ip4:198.51.100.7 ~all"
plain A 192.0.2.21
split TXT "v=spf1 ip4:192.0.2.10" " -all"
none TXT "just text, not spf"
two TXT "v=spf1 -all"
two TXT "v=spf1 +all"
spfv TXT "v=spf10 +all"
upper TXT "V=SPF1 IP4:192.0.2.10 -ALL"
neutral TXT "v=spf1 ip4:192.0.2.99"
plusall TXT "v=spf1 +all"
qall TXT "v=spf1 ?all"
wide4 TXT "v=spf1 ip4:10.0.0.0/8 ip4:192.0.2.0/16 -all"
wide6 TXT "v=spf1 ip6:2001:db8::/32 -all"
edge6 TXT "v=spf1 ip6:2001:db8::/48 -all"
a TXT "v=spf1 a -all"
a A 192.0.2.20
a AAAA 2001:db8::20
acidr TXT "v=spf1 a:host.example.org/24 -all"
awide TXT "v=spf1 a:host.example.org/8 -all"
adual TXT "v=spf1 a:host.example.org/32//64 -all"
host A 192.0.2.21
host AAAA 2001:db8::21
mx TXT "v=spf1 mx -all"
mx MX 10 mail1
mx MX 20 mail2.example.net.
mail1 A 198.51.100.1
mxcidr TXT "v=spf1 mx:mx.example.org/24 -all"
manymx TXT "v=spf1 mx -all"
nullmx TXT "v=spf1 mx ip4:192.0.2.50 -all"
nullmx MX 0 .
inc TXT "v=spf1 include:example.net include:plain.example.org -all"
incfail TXT "v=spf1 include:two.example.net ip4:192.0.2.30 -all"
incnone TXT "v=spf1 include:none.example.org -all"
incerr TXT "v=spf1 include:elsewhere.invalid -all"
incall TXT "v=spf1 include:plusall.example.org -all"
redir TXT "v=spf1 ip4:203.0.113.1 redirect=plain.example.org"
redirnone TXT "v=spf1 redirect=none.example.org"
redirall TXT "v=spf1 -all redirect=plusall.example.org"
loop TXT "v=spf1 include:loop.example.org -all"
loopr TXT "v=spf1 redirect=loopr.example.org"
ex TXT "v=spf1 exists:%{ir}.%{v}._spf.%{d} -all"
1.2.0.192.in-addr._spf.ex A 127.0.0.2
exfix TXT "v=spf1 exists:ok.example.org -all"
ok A 127.0.0.2
lmacro TXT "v=spf1 exists:%{l-}.%{o}._l.example.org -all"
first.last.lmacro.example.org._l A 127.0.0.2
smacro TXT "v=spf1 a:%{d2}.example.org -all"
example.org A 192.0.2.40
rmacro TXT "v=spf1 a:%{d1r}.rev.example.org -all"
rmacro.rev A 192.0.2.41
hmacro TXT "v=spf1 a:%{h} -all"
umacro TXT "v=spf1 exists:%{L}.enc.example.org -all"
a%2bb.enc A 127.0.0.2
ptr TXT "v=spf1 ptr -all"
ptrto TXT "v=spf1 ptr:example.net -all"
good.ptr A 192.0.2.60
pmacro TXT "v=spf1 exists:%{p}._p.example.org -all"
good.ptr.example.org._p A 127.0.0.2
void TXT "v=spf1 a:n1.example.org a:n2.example.org a:n3.example.org ip4:192.0.2.1 -all"
void2 TXT "v=spf1 a:n1.example.org a:n2.example.org ip4:192.0.2.1 -all"
eleven TXT "v=spf1 a a a a a a a a a a a ip4:192.0.2.1 -all"
ten TXT "v=spf1 a a a a a a a a a a ip4:192.0.2.1 -all"
ten A 192.0.2.250
eleven A 192.0.2.250
bad1 TXT "v=spf1 ip4:192.0.2.1 foo -all"
bad2 TXT "v=spf1 ip4:192.0.2.256 -all"
bad3 TXT "v=spf1 ip4:192.0.2.1/33 -all"
bad4 TXT "v=spf1 a:%{c}.example.org -all"
bad5 TXT "v=spf1 -all redirect=a.example.org redirect=b.example.org"
bad6 TXT "v=spf1 a:example -all"
bad7 TXT "v=spf1 ip4:192.0.2.1 exists:%{x}.example.org"
bad8 TXT "v=spf1 all:foo.example.org"
bad9 TXT "v=spf1 ip4:192.0.2.1 ?all unknown=%{"
unknownmod TXT "v=spf1 ip4:192.0.2.1 moo=bar.%{d} -all"
bad10 TXT "v=spf1 exists:%{d0}.example.org -all"
bad11 TXT "v=spf1 ip4:192.0.2.1 a:\195\169.example.org -all"
bad12 TXT "v=spf1 ip4:192.0.2.1\009-all"
long TXT "v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.x.example.org -all"
*.x A 127.0.0.2
lmacro2 TXT "v=spf1 exists:%{l2r-}.%{d3}._r.example.org -all"
a.c.lmacro2.example.org._r A 127.0.0.2
"""

for n in range(12):
    ORG += f"manymx MX {n} mx{n}\nmx{n} A 198.51.100.{n + 100}\n"

NET = r"""
@ TXT "v=spf1 ip4:198.51.100.0/24 -all"
two TXT "v=spf1 ip4:192.0.2.30 -all"
mail2 A 198.51.100.2
"""

REV = r"""
60 PTR good.ptr.example.org.
60 PTR other.example.net.
61 PTR forged.example.org.
"""

IP = ipaddress.ip_address


def run_checks(nsd: Nsd, cases: list[tuple[str, str, str]],
               helo: str = "mx.example.org") -> list[SpfResult]:
    async def go() -> list[SpfResult]:
        resolver = Resolver([nsd.server], timeout=2.0)
        return [await check(resolver, IP(ip), sender, helo, timeout=6.0)
                for ip, sender, _ in cases]
    return asyncio.run(go())


@pytest.fixture(scope="module")
def zones(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nsd]:
    with start_nsd(tmp_path_factory.mktemp("spfzones"), {
            "example.org": ORG, "example.net": NET, "2.0.192.in-addr.arpa": REV}) as nsd:
        yield nsd


# (client, sender, expected "result" or "result mechanism broad")
CASES = [
    ("192.0.2.1", "a@example.org", "pass ip4:192.0.2.0/24"),
    ("2001:db8:1::5", "a@example.org", "pass ip6:2001:db8:1::/48"),
    ("198.51.100.9", "a@example.org", "fail -all"),
    ("192.0.2.10", "a@plain.example.org", "pass ip4:192.0.2.10"),
    ("192.0.2.11", "a@plain.example.org", "softfail ~all"),
    ("192.0.2.10", "a@split.example.org", "pass ip4:192.0.2.10"),  # strings joined
    ("192.0.2.1", "a@none.example.org", "none"),
    ("192.0.2.1", "a@nx.example.org", "none"),                     # NXDOMAIN
    ("192.0.2.1", "a@two.example.org", "permerror"),               # two records
    ("192.0.2.1", "a@spfv.example.org", "none"),                   # v=spf10 is not SPF
    ("192.0.2.10", "a@upper.example.org", "pass IP4:192.0.2.10"),
    ("192.0.2.1", "a@neutral.example.org", "neutral"),             # no match, no all
    ("192.0.2.1", "a@plusall.example.org", "pass +all all"),        # too broad
    ("192.0.2.1", "a@qall.example.org", "neutral ?all"),
    ("10.1.2.3", "a@wide4.example.org", "pass ip4:10.0.0.0/8 /8"),
    ("192.0.77.1", "a@wide4.example.org", "pass ip4:192.0.2.0/16"),  # a /16 pools
    ("2001:db8:ff::1", "a@wide6.example.org", "pass ip6:2001:db8::/32 /32"),
    ("2001:db8::1", "a@edge6.example.org", "pass ip6:2001:db8::/48"),
    ("192.0.2.20", "a@a.example.org", "pass a"),
    ("2001:db8::20", "a@a.example.org", "pass a"),
    ("192.0.2.21", "a@a.example.org", "fail -all"),
    ("192.0.2.99", "a@acidr.example.org", "pass a:host.example.org/24"),
    ("192.9.9.9", "a@awide.example.org", "pass a:host.example.org/8 /8"),
    ("2001:db8::ffff", "a@adual.example.org", "pass a:host.example.org/32//64"),
    ("192.0.2.22", "a@adual.example.org", "fail -all"),
    ("198.51.100.1", "a@mx.example.org", "pass mx"),
    ("198.51.100.2", "a@mx.example.org", "pass mx"),               # MX in another zone
    ("198.51.100.3", "a@mx.example.org", "fail -all"),
    ("198.51.100.103", "a@manymx.example.org", "permerror"),       # 12 MX names
    ("192.0.2.50", "a@nullmx.example.org", "pass ip4:192.0.2.50"),  # MX "." skipped
    ("198.51.100.5", "a@inc.example.org", "pass ip4:198.51.100.0/24"),
    ("192.0.2.10", "a@inc.example.org", "pass ip4:192.0.2.10"),
    ("192.0.2.11", "a@inc.example.org", "fail -all"),               # softfail inside: no match
    ("192.0.2.30", "a@incfail.example.org", "pass ip4:192.0.2.30"),  # included fail: no match
    ("192.0.2.1", "a@incnone.example.org", "permerror"),
    ("192.0.2.1", "a@incerr.example.org", "temperror"),             # REFUSED: a DNS failure
    ("192.0.2.1", "a@incall.example.org", "pass +all all"),
    ("192.0.2.10", "a@redir.example.org", "pass ip4:192.0.2.10"),
    ("203.0.113.1", "a@redir.example.org", "pass ip4:203.0.113.1"),
    ("192.0.2.11", "a@redir.example.org", "softfail ~all"),
    ("192.0.2.1", "a@redirnone.example.org", "permerror"),
    ("192.0.2.1", "a@redirall.example.org", "fail -all"),           # all wins over redirect
    ("192.0.2.1", "a@loop.example.org", "permerror"),
    ("192.0.2.1", "a@loopr.example.org", "permerror"),
    ("192.0.2.1", "a@ex.example.org", "pass exists:%{ir}.%{v}._spf.%{d} exists"),
    ("192.0.2.2", "a@ex.example.org", "fail -all"),
    ("192.0.2.2", "a@exfix.example.org", "pass exists:ok.example.org exists"),
    ("192.0.2.2", "first-last@lmacro.example.org", "pass exists:%{l-}.%{o}._l.example.org exists"),
    ("192.0.2.40", "a@smacro.example.org", "pass a:%{d2}.example.org"),
    ("192.0.2.41", "a@rmacro.example.org", "pass a:%{d1r}.rev.example.org"),
    ("192.0.2.21", "a@hmacro.example.org", "fail -all"),
    ("192.0.2.2", "a+b@umacro.example.org", "pass exists:%{L}.enc.example.org exists"),
    ("192.0.2.60", "a@ptr.example.org", "pass ptr"),
    ("192.0.2.61", "a@ptr.example.org", "fail -all"),               # not forward-confirmed
    ("192.0.2.60", "a@ptrto.example.org", "fail -all"),             # other.example.net has no A
    ("192.0.2.60", "a@pmacro.example.org", "pass exists:%{p}._p.example.org exists"),
    ("192.0.2.1", "a@void.example.org", "permerror"),               # third void lookup
    ("192.0.2.1", "a@void2.example.org", "pass ip4:192.0.2.1"),
    ("192.0.2.1", "a@eleven.example.org", "permerror"),             # 11 DNS terms
    ("192.0.2.1", "a@ten.example.org", "pass ip4:192.0.2.1"),
    *[("192.0.2.1", f"a@bad{n}.example.org", "permerror") for n in range(1, 13)],
    # 5 x 63 characters: shortened from the left to 253 (RFC 7208 7.3)
    ("192.0.2.1", f"{'a' * 63}@long.example.org",
     "pass exists:%{l}.%{l}.%{l}.%{l}.%{l}.x.example.org exists"),
    ("192.0.2.1", "c-a-b@lmacro2.example.org",                     # reversed, 2 right parts
     "pass exists:%{l2r-}.%{d3}._r.example.org exists"),
    ("192.0.2.1", "a@unknownmod.example.org", "pass ip4:192.0.2.1"),
    ("192.0.2.1", "", "fail -all"),                                 # HELO mx.example.org's
    ("192.0.2.1", "a@localhost", "none"),                           # one label
    ("192.0.2.1", "a@bad..example.org", "none"),                    # malformed
]


def summary(result: SpfResult) -> str:
    return " ".join(x for x in (result.result, result.mechanism, result.broad) if x)


def test_each_mechanism_limit_and_macro(zones: Nsd) -> None:
    got = [summary(r) for r in run_checks(zones, CASES)]
    assert got == [expected for _, _, expected in CASES]


def test_hmacro_and_null_sender_use_helo(zones: Nsd) -> None:
    cases = [("192.0.2.21", "a@hmacro.example.org", ""), ("192.0.2.10", "", ""),
             ("192.0.2.10", "<>", "")]
    got = run_checks(zones, cases, helo="plain.example.org")
    assert [summary(r) for r in got] == [
        "pass a:%{h} macro", "pass ip4:192.0.2.10", "pass ip4:192.0.2.10"]
    assert [r.domain for r in got] == ["hmacro.example.org"] + ["plain.example.org"] * 2


def test_split_sender() -> None:
    assert split_sender("User@Example.org", "h.example") == ("User", "Example.org")
    assert split_sender("", "h.example") == ("postmaster", "h.example")
    assert split_sender("<>", "h.example") == ("postmaster", "h.example")
    assert split_sender("@example.org", "h") == ("postmaster", "example.org")
    assert split_sender('"a@b"@example.org', "h") == ('"a@b"', "example.org")
    assert split_sender("nodomain", "h") == ("postmaster", "")


def test_pooled_only_for_a_narrow_pass(zones: Nsd) -> None:
    results = run_checks(zones, [
        ("192.0.2.1", "a@example.org", ""), ("192.0.2.1", "a@plusall.example.org", ""),
        ("198.51.100.9", "a@example.org", ""), ("192.0.2.1", "a@ex.example.org", "")])
    assert [r.pooled for r in results] == [True, False, False, False]


def test_a_silent_server_costs_at_most_the_bound() -> None:
    with silent_dns_server() as server:
        async def go() -> tuple[SpfResult, float]:
            resolver = Resolver([server], timeout=5.0)
            start = time.monotonic()
            result = await check(resolver, IP("192.0.2.1"), "a@example.org", "h.example",
                                 timeout=0.5)
            return result, time.monotonic() - start
        result, took = asyncio.run(go())
    assert (result.result, result.dns) == ("temperror", "timeout")
    assert took < 0.5 + 2.0


def test_a_dns_failure_is_temperror_with_dns_failure(zones: Nsd) -> None:
    [result] = run_checks(zones, [("192.0.2.1", "a@elsewhere.invalid", "")])
    assert (result.result, result.dns) == ("temperror", "failure")


def test_limits_are_rfc_7208s() -> None:
    assert (limits.SPF_MAX_DNS_TERMS, limits.SPF_MAX_VOID_LOOKUPS,
            limits.SPF_MAX_MX_NAMES, limits.SPF_MAX_PTR_NAMES) == (10, 2, 10, 10)


class BrokenResolver(Resolver):
    """Stands in for a bug in the evaluation (the real resolver never raises)."""

    async def query(self, name: str, rdtype: str) -> Answer:
        raise RuntimeError("bug")


def test_an_evaluation_that_fails_is_permerror_never_an_exception(
        caplog: pytest.LogCaptureFixture) -> None:
    """A failed request would answer DUNNO (no greylisting): a record that
    trips a bug must cost its sender the SPF key, nothing more."""
    async def go() -> SpfResult:
        return await check(BrokenResolver([("127.0.0.1", 9)]), IP("192.0.2.1"),
                           "a@example.org", "h.example", timeout=1.0)
    result = asyncio.run(go())
    assert (result.result, result.reason) == ("permerror", "internal error: bug")
    assert "SPF evaluation for example.org failed: RuntimeError: bug" in caplog.text

"""DNSBL/DNSWL scores (policyd.dnsbl): postscreen_dnsbl_sites' syntax, the
sum as postscreen computes it, and what a score does to greylisting, asked
of a real DNS server (nsd on a loopback port, tests.dnslab)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from memtable import clock
from memtable.endpoint import parse_endpoint
from memtable.errors import ConfigError
from policyd import limits
from policyd.api import Decision
from policyd.cli import main
from policyd.config import PolicydConfig
from policyd.dns import Answer, Resolver
from policyd.dnsbl import (
    DNSWL,
    LISTED,
    NEUTRAL,
    UNKNOWN,
    UNLISTED,
    AddressFilter,
    DnsblScorer,
    DnsblSite,
    DnsScore,
    parse_filter,
    parse_sites,
    reversed_prefix,
)
from policyd.logsetup import format_decision
from policyd.metrics import start_metrics
from policyd.whitelist import Whitelists
from tests.dnslab import Nsd, silent_dns_server
from tests.greylist_helpers import config, make_policy, request
from tests.policyd_proc import PolicydProcess
from tests.test_metrics import scrape, value

NsdFactory = Callable[[Mapping[str, str]], Nsd]

# --- the syntax ----------------------------------------------------------------

ISSUE_EXAMPLE = ("zen.spamhaus.org*3, b.barracudacentral.org*2, "
                 "list.dnswl.org=127.0.[0..255].[1..3]*-2")


def test_sites_parse_as_postscreen_reads_them() -> None:
    assert parse_sites(ISSUE_EXAMPLE.replace(",", " ").split()) == (
        DnsblSite("zen.spamhaus.org", None, 3),
        DnsblSite("b.barracudacentral.org", None, 2),
        DnsblSite("list.dnswl.org",
                  AddressFilter((((127, 127),), ((0, 0),), ((0, 255),), ((1, 3),))), -2),
    )
    # No weight: 1.  "+" and brackets around the whole filter are Postfix's too;
    # a domain named twice is two items.
    assert parse_sites(["bl.example", "bl.example=[127.0.0.[2;4..5]]*+4"]) == (
        DnsblSite("bl.example", None, 1),
        DnsblSite("bl.example",
                  AddressFilter((((127, 127),), ((0, 0),), ((0, 0),), ((2, 2), (4, 5)))), 4),
    )


@pytest.mark.parametrize(("pattern", "result"), [
    ("127.0.0.2", "127.0.0.2"),
    ("127.0.[0..255].[1..3]", "127.0.[0..255].[1..3]"),
    ("127.0.0.[2;4;10..11]", "127.0.0.[2;4;10..11]"),
    ("[127.0.0.[2]]", "127.0.0.2"),
    ("[[1;2].0.0.1]", "[1;2].0.0.1"),
    ("127.0.256.1", 'need decimal number 0..255 or "[" at "127.0.>256<.1"'),
    ("127.0.0.", 'need decimal number 0..255 or "[" at "127.0.0.><"'),
    ("127.0.0", 'need "." at "127.0.0><"'),
    ("x", 'need decimal number 0..255 or "[" at ">x<"'),
    ("127.0.[].1", 'need decimal number 0..255 at "127.0.[>]<.1"'),
    ("127.0.[1-5].1", 'need ";" or "]" at "127.0.[1>-<5].1"'),
    ("127.0.[1..300].1", 'numeric range error at "127.0.[1..>300<].1"'),
    ("127.0.[9..1].1", 'numeric range error at "127.0.[9..>1<].1"'),
    ("127.0.[1.2].1", 'numeric range error at "127.0.[1.>2<].1"'),
    ("127.0.0.1x", 'garbage after pattern at "127.0.0.1>x<"'),
    ("[127.0.0.1", 'missing "]" character'),
    ("", "empty address pattern"),
])
def test_filter_syntax_and_messages_are_ip_match(pattern: str, result: str) -> None:
    try:
        assert str(parse_filter(pattern)) == result
    except ValueError as exc:
        assert str(exc) == result


@pytest.mark.parametrize(("pattern", "address", "matches"), [
    ("127.0.0.2", "127.0.0.2", True),
    ("127.0.0.2", "127.0.0.3", False),
    ("127.0.[0..255].[1..3]", "127.0.15.3", True),
    ("127.0.[0..255].[1..3]", "127.0.15.4", False),
    ("127.0.0.[2;4;10..11]", "127.0.0.4", True),
    ("127.0.0.[2;4;10..11]", "127.0.0.11", True),
    ("127.0.0.[2;4;10..11]", "127.0.0.9", False),
    ("127.0.0.2", "not-an-address", False),
])
def test_filter_matches(pattern: str, address: str, matches: bool) -> None:
    assert parse_filter(pattern).matches(address) is matches


@pytest.mark.parametrize(("site", "message"), [
    ("bl.example*x", 'bad DNSBL weight factor "x" in "bl.example*x"'),
    ("bl.example*", 'bad DNSBL weight factor "" in "bl.example*"'),
    ("bl.example*2=127.0.0.2", 'bad DNSBL weight factor "2=127.0.0.2"'),
    ("bl.example=127.0.0", 'bad DNSBL filter syntax: need "." at "127.0.0><"'),
    ("bl..example", 'bad DNSBL domain name "bl..example"'),
    ("-bl.example", 'bad DNSBL domain name "-bl.example"'),
    ("127.0.0.1", 'bad DNSBL domain name "127.0.0.1"'),
    ("bl.example.", 'bad DNSBL domain name "bl.example."'),
    ("bl.example*9999999", "beyond +-1000000"),
    # Past Python's int() limit (4300 digits): the same words, no ValueError.
    ("bl.example*" + "9" * 5000, "beyond +-1000000"),
    ("bl.example=127.0.0.[2.." + "9" * 5000 + "]", "bad DNSBL filter syntax: "),
    (".".join(["a" * 60, "b" * 60, "c" * 60, "d" * 10]), "longer than 189 characters"),
])
def test_bad_sites_name_the_file_and_line(tmp_path: Path, site: str, message: str) -> None:
    cf = tmp_path / "policyd.cf"
    cf.write_text(f"greylist_delay = 300\ndnsbl_sites = ok.example,\n    {site}\n")
    with pytest.raises(ConfigError) as info:
        PolicydConfig.from_file(str(cf))
    assert str(info.value).startswith(f"{cf}, line 2: dnsbl_sites = ok.example,")
    assert f" {site}: " in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    ("dnsbl_allowlist_threshold = -1\n", "line 1: dnsbl_allowlist_threshold = -1: needs "
                                         "dnsbl_sites"),
    ("dnsbl_greylist_threshold = 2\n", "line 1: dnsbl_greylist_threshold = 2: needs dnsbl_sites"),
    ("dnsbl_sites = bl.example\ndnsbl_greylist_threshold = 0\n", "line 2: "
     "dnsbl_greylist_threshold = 0: invalid value 0 < 1"),
    ("dnsbl_sites = bl.example\ndnsbl_allowlist_threshold = 1\n", "invalid value 1 > 0"),
    ("dnsbl_sites = bl.example\ngreylist_delay_listed = 1h\n", "line 2: greylist_delay_listed "
     "= 1h: needs dnsbl_greylist_threshold"),
    ("dnsbl_sites = bl.example\ndnsbl_greylist_threshold = 1\ngreylist_delay_listed = 3d\n",
     "retry_window must be longer than greylist_delay_listed"),
    ("dnsbl_sites = bl.example\ndns_timeout = 20\n", "line 2: dns_timeout = 20: DNS may take "
     "up to 20.5s of a decision (dns_timeout for the DNS lists): it must be shorter than "
     "decision_timeout (20s)"),
    ("dnsbl_sites = " + ", ".join(f"l{i}.example" for i in range(limits.DNSBL_MAX_SITES + 1))
     + "\n", f"more than {limits.DNSBL_MAX_SITES} DNSBL sites"),
])
def test_bad_settings_together(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               text: str, message: str) -> None:
    cf = tmp_path / "policyd.cf"
    cf.write_text(text)
    assert main(["--check-config", "-c", str(cf)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"policyd: {cf}")
    assert message in captured.err
    assert captured.err.count("\n") == 1


def test_check_config_shows_the_sites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) \
        -> None:
    cf = tmp_path / "policyd.cf"
    cf.write_text(f"triplet_table = lmdb:{tmp_path}/t\nclient_table = lmdb:{tmp_path}/c\n"
                  f"dnsbl_sites = {ISSUE_EXAMPLE}, bl.example=[127.0.0.[2]]\n"
                  "dnsbl_allowlist_threshold = -1\ndnsbl_greylist_threshold = 3\n"
                  "greylist_delay_listed = 30m\ndns_servers = 127.0.0.1:5353\n")
    assert main(["--check-config", "-c", str(cf)]) == 0
    out = capsys.readouterr().out
    assert f"dnsbl_sites = {ISSUE_EXAMPLE}, bl.example=127.0.0.2\n" in out
    assert "dnsbl_allowlist_threshold = -1\n" in out
    assert "dnsbl_greylist_threshold = 3\n" in out
    assert "greylist_delay_listed = 1800\n" in out
    # The rendered configuration reads back as the same configuration.
    again = tmp_path / "again.cf"
    again.write_text("\n".join(line for line in out.splitlines() if not line.startswith("#")
                               and not line.endswith("= ")) + "\n")
    assert PolicydConfig.from_file(str(again)).dnsbl_sites == \
        PolicydConfig.from_file(str(cf)).dnsbl_sites


def test_defaults_ask_no_dns() -> None:
    cfg = PolicydConfig()
    assert (cfg.dnsbl_sites, cfg.dnsbl_allowlist_threshold, cfg.dnsbl_greylist_threshold,
            cfg.greylist_delay_listed, cfg.uses_dns) == ((), 0, None, None, False)
    assert replace(cfg, dnsbl_sites=parse_sites(["bl.example"])).uses_dns


def test_reversed_prefix_is_dnsblogs() -> None:
    assert reversed_prefix(ipaddress.IPv4Address("192.0.2.1")) == "1.2.0.192."
    # IPv6: every nibble of the full address, last first (as ip6.arpa).
    assert reversed_prefix(ipaddress.IPv6Address("2001:db8::5")) == \
        "5." + "0." * 23 + "8.b.d.0.1.0.0.2."


# --- the sum, against a real DNS server ------------------------------------------------

V6_LISTED = "2001:db8::5"
BL_ZONE = f"""
1.2.0.192 300 IN A 127.0.0.2
1.2.0.192 300 IN A 127.0.0.4
3.2.0.192 300 IN A 127.0.0.11
6.2.0.192 300 IN A 127.0.0.2
{reversed_prefix(ipaddress.IPv6Address(V6_LISTED))[:-1]} 300 IN A 127.0.0.2
"""
WL_ZONE = """
4.2.0.192 300 IN A 127.0.10.2
5.2.0.192 300 IN A 127.0.10.9
6.2.0.192 300 IN A 127.0.10.1
"""
SITES = parse_sites(["bl.test*3", "bl.test=127.0.0.4*2", "bl.test=127.0.0.[5..9;11]",
                     "wl.test=127.0.[0..255].[1..3]*-5"])


@pytest.fixture
def lists(nsd_factory: NsdFactory) -> Nsd:
    return nsd_factory({"bl.test": BL_ZONE, "wl.test": WL_ZONE})


@pytest.mark.parametrize(("client", "score"), [
    # Listed twice by bl.test: "*3" counts once for both A records, the
    # 127.0.0.4 filter adds 2, the [5..9;11] filter matches neither.
    ("192.0.2.1", 5),
    ("192.0.2.3", 3 + 1),       # 127.0.0.11: any answer, and the ;11 member
    ("192.0.2.4", -5),          # DNSWL only
    ("192.0.2.5", 0),           # DNSWL answer outside its filter
    ("192.0.2.6", 3 - 5),       # on both
    ("192.0.2.99", 0),          # on none (NXDOMAIN)
    (V6_LISTED, 3),             # IPv6 nibbles
    ("2001:db8::6", 0),
])
def test_score_is_postscreens_sum(lists: Nsd, client: str, score: int) -> None:
    async def ask() -> DnsScore:
        scorer = DnsblScorer(SITES, Resolver([lists.server], timeout=2.0))
        return await scorer.score(ipaddress.ip_address(client))

    assert asyncio.run(ask()) == DnsScore(score)


class CountingResolver(Resolver):
    """A real Resolver that counts the queries it is asked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[str, str]] = []

    async def query(self, name: str, rdtype: str) -> Answer:
        self.asked.append((name, rdtype))
        return await super().query(name, rdtype)


def test_one_query_per_domain_all_at_once(lists: Nsd) -> None:
    async def ask() -> tuple[DnsScore, list[tuple[str, str]]]:
        resolver = CountingResolver([lists.server], timeout=2.0)
        score = await DnsblScorer(SITES, resolver).score(ipaddress.ip_address("192.0.2.6"))
        return score, resolver.asked

    score, asked = asyncio.run(ask())
    assert score == DnsScore(-2)
    assert asked == [("6.2.0.192.bl.test", "A"), ("6.2.0.192.wl.test", "A")]


def test_judged_as_postscreen_does() -> None:
    def outcome(value: int | None, allow: int = 0, grey: int | None = None) -> str:
        scorer = DnsblScorer(SITES, Resolver([("127.0.0.1", 9)]), allowlist_threshold=allow,
                             greylist_threshold=grey)
        return scorer.judge(DnsScore(value, None if value is not None else "timeout")).outcome

    assert outcome(-5) == NEUTRAL            # allowlist threshold 0: off, as postscreen's
    assert outcome(-5, allow=-5) == DNSWL    # at or below
    assert outcome(-4, allow=-5) == NEUTRAL
    assert outcome(2, grey=3) == UNLISTED
    assert outcome(3, grey=3) == LISTED
    assert outcome(-5, allow=-1, grey=3) == DNSWL
    assert outcome(None, allow=-1, grey=3) == UNKNOWN


# --- what a score does to greylisting ----------------------------------------------------

NOW = 1_714_564_800


@pytest.fixture
def at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    """Move memtable's clock (the seam every record time goes through)."""
    now = [float(NOW)]
    monkeypatch.setattr(clock, "now", lambda: now[0])

    def move(offset: int) -> None:
        now[0] = float(NOW + offset)

    yield move


def dns_config(server: tuple[str, int], **overrides: Any) -> PolicydConfig:
    return config(dnsbl_sites=SITES, dns_servers=(server,), dns_timeout=1, **overrides)


def run_steps(cfg: PolicydConfig, resolver_server: tuple[str, int],
              steps: list[tuple[int, dict[str, str]]], move: Callable[[int], None],
              timeout: float = 2.0, whitelist: Whitelists | None = None) \
        -> tuple[list[Decision], list[str], Any, Any]:
    """The decisions, the clients whose score was asked for, the tables."""
    async def go() -> tuple[list[Decision], list[str], Any, Any]:
        resolver = Resolver([resolver_server], timeout=timeout)
        policy, triplets, clients = make_policy(cfg, resolver=resolver, whitelist=whitelist)
        assert policy.dnsbl is not None
        scored: list[str] = []
        score = policy.dnsbl.score

        async def counted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> DnsScore:
            scored.append(str(ip))
            return await score(ip)

        policy.dnsbl.score = counted  # type: ignore[method-assign]
        decisions = []
        for offset, req in steps:
            move(offset)
            decisions.append(await policy.decide(req))
        await policy.aclose()
        return decisions, scored, triplets, clients

    return asyncio.run(go())


def test_a_dnswl_listed_client_is_not_greylisted(lists: Nsd, at: Callable[[int], None]) \
        -> None:
    cfg = dns_config(lists.server, dnsbl_allowlist_threshold=-3)
    (first, second), _, triplets, clients = run_steps(
        cfg, lists.server, [(0, request(client_address="192.0.2.4")),
                            (10, request(client_address="192.0.2.4", recipient="c@example.com"))],
        at)
    assert first == second == Decision("DUNNO", "dnswl", dns_score=-5)
    assert triplets.data == {} and clients.data == {}  # nothing to remember
    # A client on a DNSBL too, but not low enough, is greylisted as before.
    (mixed,), _, _, _ = run_steps(cfg, lists.server, [(0, request(client_address="192.0.2.6"))],
                                  at)
    assert mixed == Decision("DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 300 seconds",
                             "new", dns_score=-2)


def test_a_listed_client_waits_greylist_delay_listed(lists: Nsd, at: Callable[[int], None]) \
        -> None:
    cfg = dns_config(lists.server, dnsbl_greylist_threshold=1, greylist_delay_listed=900)
    listed = request(client_address="192.0.2.1")
    decisions, _, _, _ = run_steps(cfg, lists.server, [(0, listed), (301, listed),
                                                       (901, listed)], at)
    assert decisions[0] == Decision(
        "DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 900 seconds", "new", dns_score=5)
    # After greylist_delay, but not yet greylist_delay_listed: still deferred.
    assert decisions[1] == Decision(
        "DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 599 seconds", "early-retry",
        dns_score=5)
    assert decisions[2].reason == "passed" and decisions[2].delay == 901
    assert decisions[2].dns_score == 5


def test_with_a_greylist_threshold_an_unlisted_client_is_not_greylisted(
        lists: Nsd, at: Callable[[int], None]) -> None:
    cfg = dns_config(lists.server, dnsbl_greylist_threshold=4)
    decisions, _, triplets, _ = run_steps(
        cfg, lists.server, [(0, request(client_address="192.0.2.99")),
                            (0, request(client_address="192.0.2.3"))], at)
    assert decisions[0] == Decision("DUNNO", "unlisted", dns_score=0)
    assert decisions[1] == Decision(
        "DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 300 seconds", "new", dns_score=4)
    assert len(triplets.data) == 1


def test_a_dns_server_that_never_answers_costs_at_most_dns_timeout(
        at: Callable[[int], None], caplog: pytest.LogCaptureFixture) -> None:
    with silent_dns_server() as server:
        cfg = dns_config(server, dnsbl_allowlist_threshold=-1, dnsbl_greylist_threshold=1,
                         greylist_delay_listed=900)
        start = time.monotonic()
        (first, retry), _, _, _ = run_steps(
            cfg, server, [(0, request(client_address="192.0.2.4")),
                          (301, request(client_address="192.0.2.4"))], at, timeout=0.5)
        took = time.monotonic() - start
    # Greylisted as without DNS: the plain delay, never DUNNO nor a failure.
    assert first == Decision("DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 300 "
                             "seconds", "new", dns="timeout")
    assert retry.reason == "passed" and retry.dns == "timeout"
    assert took < 2 * (0.5 + limits.DNS_TIMEOUT_SLACK_SECONDS) + 2.0  # two requests, bounded
    # Which list failed is logged, once a minute per list, not per request.
    warnings = [r.getMessage() for r in caplog.records if r.name == "policyd.dnsbl"]
    assert sorted(warnings) == [
        f"DNS list {domain} did not answer (timeout): scores are unknown, clients are "
        "greylisted as without DNS" for domain in ("bl.test", "wl.test")]


def test_dns_is_asked_only_when_the_decision_needs_it(
        lists: Nsd, at: Callable[[int], None], tmp_path: Path) -> None:
    cfg = dns_config(lists.server, dnsbl_allowlist_threshold=-1, auto_whitelist_clients=1)
    r = request(client_address="192.0.2.1", instance="m1")
    listed = tmp_path / "clients"
    listed.write_text("192.0.2.3\n")
    steps = [
        (0, request(client_address="192.0.2.1", protocol_state="DATA")),  # not RCPT
        (0, request(client_address="192.0.2.1", sasl_username="u")),     # authenticated
        (0, request(client_address="192.0.2.3")),                         # whitelisted
        (0, r), (100, r), (301, r),  # new, early retry, pass: asked each time
        (400, r),                    # auto-whitelisted after one pass: not asked
    ]
    decisions, scored, _, _ = run_steps(cfg, lists.server, steps, at,
                                        whitelist=Whitelists.load([str(listed)], []))
    assert [d.reason for d in decisions] == ["not-rcpt", "authenticated", "whitelisted", "new",
                                             "early-retry", "passed", "auto-whitelisted"]
    assert scored == ["192.0.2.1"] * 3
    # A passed triplet of a client not yet auto-whitelisted: not asked either.
    cfg = replace(cfg, auto_whitelist_clients=5)
    decisions, scored, _, _ = run_steps(cfg, lists.server, [(0, r), (301, r), (400, r)], at)
    assert decisions[2] == Decision("DUNNO", "passed")
    assert scored == ["192.0.2.1"] * 2


# --- visible decisions ---------------------------------------------------------------


def test_decision_lines_say_what_dns_contributed() -> None:
    req = request(client_address="192.0.2.4", queue_id="ABC")
    assert format_decision(req, Decision("DUNNO", "dnswl", dns_score=-5)).endswith(
        "reason=dnswl client=192.0.2.4 client_name=mail.example.org sender=alice@example.org "
        "recipient=bob@example.com delay=- queue_id=ABC dns_score=-5")
    assert format_decision(req, Decision("DEFER_IF_PERMIT 4.2.0 x", "new", dns="timeout")) \
        .endswith("queue_id=ABC dns=timeout")
    assert "dns" not in format_decision(req, Decision("DUNNO", "passed"))


def test_metrics_count_dns_results_and_scores() -> None:
    metrics = start_metrics(parse_endpoint("inet:127.0.0.1:0"))
    try:
        metrics.observe_decision(Decision("DUNNO", "dnswl", dns_score=-5))
        metrics.observe_decision(Decision("DEFER_IF_PERMIT x", "new", dns_score=3))
        metrics.observe_decision(Decision("DEFER_IF_PERMIT x", "new", dns="timeout"))
        metrics.observe_decision(Decision("DUNNO", "passed"))
        samples = scrape(metrics)
    finally:
        metrics.close()
    assert value(samples, "policyd_decisions_total", action="DUNNO", reason="dnswl") == 1
    assert value(samples, "policyd_dnsbl_lookups_total", result="answered") == 2
    assert value(samples, "policyd_dnsbl_lookups_total", result="timeout") == 1
    assert value(samples, "policyd_dnsbl_lookups_total", result="failure") == 0
    assert value(samples, "policyd_dnsbl_score_bucket", le="-5.0") == 1
    assert value(samples, "policyd_dnsbl_score_bucket", le="3.0") == 2
    assert value(samples, "policyd_dnsbl_score_count") == 2  # (no _sum: scores go negative)


# --- end to end: a real policyd process asking a real nsd ---------------------------------


def test_policyd_process_with_dnsbl_sites(lists: Nsd, tmp_path: Path,
                                          policyd_factory: type[PolicydProcess]) -> None:
    sites = ", ".join(str(s) for s in SITES)
    proc = policyd_factory(tmp_path / "p", None, extra=(
        f"dns_servers = {lists.spec}\ndns_timeout = 2\ndnsbl_sites = {sites}\n"
        "dnsbl_allowlist_threshold = -1\ndnsbl_greylist_threshold = 1\n"
        "greylist_delay_listed = 15m\n")).start()
    assert proc.ask(client_address="192.0.2.4") == "DUNNO"
    assert proc.ask(client_address="192.0.2.1") == \
        "DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 900 seconds"
    assert proc.ask(client_address="192.0.2.99") == "DUNNO"
    proc.stop()
    log = proc.log_text()
    assert "reason=dnswl client=192.0.2.4 " in log and " dns_score=-5" in log
    assert "reason=new client=192.0.2.1 " in log and " dns_score=5" in log
    assert "reason=unlisted client=192.0.2.99 " in log

"""client_key = spf and greylist_delay_spf_pass: the greylisting policy over
in-memory tables, asking a real DNS server (nsd) for the senders' SPF."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from memtable import clock
from memtable.errors import ConfigError
from policyd import limits, logsetup
from policyd.api import Decision
from policyd.config import PolicydConfig
from policyd.dns import Answer, Resolver
from policyd.whitelist import Whitelists
from tests.dnslab import Nsd, silent_dns, silent_dns_server, start_nsd
from tests.greylist_helpers import DictTable, config, make_policy, request, run, write

T0 = "2024-05-01 12:00:00"
START = 1714564800

ZONE = """
@ TXT "v=spf1 ip4:192.0.2.10 ip4:198.51.100.20 -all"
open TXT "v=spf1 +all"
soft TXT "v=spf1 ip4:192.0.2.10 ~all"
"""


class CountingResolver(Resolver):
    """The real resolver, remembering what it was asked."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.asked: list[tuple[str, str]] = []

    async def query(self, name: str, rdtype: str) -> Answer:
        self.asked.append((name, rdtype))
        return await super().query(name, rdtype)


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nsd]:
    with start_nsd(tmp_path_factory.mktemp("spfgrey"), {"example.org": ZONE}) as server:
        yield server


def scenario(cfg: PolicydConfig, resolver_of: Any, steps: list[tuple[int, dict[str, str]]],
             **kw: Any) -> tuple[list[Decision], DictTable, DictTable, CountingResolver]:
    decisions: list[Decision] = []

    async def main() -> tuple[DictTable, DictTable, CountingResolver]:
        resolver = resolver_of()
        policy, triplets, clients = make_policy(cfg, resolver=resolver, **kw)
        # real_asyncio: the event loop's clock (DNS timeouts) stays real.
        with freeze_time(T0, real_asyncio=True) as frozen:
            for offset, req in steps:
                frozen.move_to(datetime.fromtimestamp(START + offset, tz=UTC))
                decisions.append(await policy.decide(req))
        await policy.aclose()
        return triplets, clients, resolver

    triplets, clients, resolver = run(main())
    return decisions, triplets, clients, resolver


def spf_config(**kw: Any) -> PolicydConfig:
    return config(client_key="spf", auto_whitelist_clients=0, **kw)


def test_a_pool_authorised_by_spf_is_one_client(nsd: Nsd) -> None:
    first = request(client_address="192.0.2.10", instance="i1")
    retry = request(client_address="198.51.100.20", client_name="unknown", instance="i2")
    (new, passed), triplets, clients, _ = scenario(
        spf_config(greylist_delay_spf_pass=60), lambda: CountingResolver([nsd.server]),
        [(0, first), (61, retry)])
    assert new.action == "DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 60 seconds"
    assert new.fields == (("spf", "pass"), ("client_key", "spf:example.org"))
    assert (passed.reason, passed.delay) == ("passed", 61.0)
    assert list(triplets.data) == ["spf:example.org/alice@example.org/bob@example.com"]
    assert list(clients.data) == ["spf:example.org"]  # the reputation follows the key


def test_a_sender_without_a_narrow_pass_is_keyed_by_subnet(nsd: Nsd) -> None:
    steps = [(0, request(client_address="198.51.100.99")),                       # fail
             (1, request(client_address="192.0.2.77", sender="a@open.example.org")),  # +all
             (2, request(client_address="203.0.113.5", sender="a@soft.example.org")),
             (3, request(client_address="203.0.113.6", sender="")),               # HELO: none
             ]
    decisions, triplets, _, _ = scenario(
        spf_config(greylist_delay_spf_pass=60), lambda: CountingResolver([nsd.server]), steps)
    assert [d.fields for d in decisions] == [
        (("spf", "fail"),), (("spf", "pass"), ("spf_broad", "all")), (("spf", "softfail"),),
        (("spf", "none"),)]
    assert all("in 300 seconds" in d.action for d in decisions)  # the full delay
    assert sorted(k.split("/")[0] for k in triplets.data) == [
        "192.0.2.0", "198.51.100.0", "203.0.113.0", "203.0.113.0"]


def test_the_fallback_key_is_configurable(nsd: Nsd) -> None:
    r = request(client_address="198.51.100.99", client_name="out.mail.example.net")
    _, triplets, _, _ = scenario(spf_config(spf_fallback_client_key="smart"),
                                 lambda: CountingResolver([nsd.server]), [(0, r)])
    assert list(triplets.data) == ["example.net/alice@example.org/bob@example.com"]


def test_spf_pass_shortens_the_delay_with_subnet_keys_too(nsd: Nsd) -> None:
    r = request(client_address="192.0.2.10")
    (new, passed, known), triplets, _, resolver = scenario(
        config(greylist_delay_spf_pass=60, auto_whitelist_clients=0),
        lambda: CountingResolver([nsd.server]), [(0, r), (61, r), (62, r)])
    assert "in 60 seconds" in new.action
    assert new.fields == (("spf", "pass"),)
    assert passed.reason == "passed"
    assert list(triplets.data) == ["192.0.2.0/alice@example.org/bob@example.com"]
    # A known triplet needs no SPF: only the first two requests asked.
    assert known == Decision("DUNNO", "passed")
    assert resolver.asked == [("example.org", "TXT")] * 2


def test_dns_is_never_asked_for_requests_decided_without_it(nsd: Nsd, tmp_path: Path) -> None:
    whitelist = Whitelists.load((write(tmp_path / "whitelist_clients", "192.0.2.10\n"),), ())
    steps = [(0, request(client_address="192.0.2.10")),                 # whitelisted
             (1, request(protocol_state="DATA")),
             (2, request(sasl_username="alice", client_address="198.51.100.20"))]
    decisions, _, _, resolver = scenario(
        spf_config(), lambda: CountingResolver([nsd.server]), steps, whitelist=whitelist)
    assert [d.reason for d in decisions] == ["whitelisted", "not-rcpt", "authenticated"]
    assert resolver.asked == []


def test_a_dns_timeout_greylists_as_without_spf() -> None:
    with silent_dns_server() as server:
        decisions, triplets, _, _ = scenario(
            spf_config(greylist_delay_spf_pass=60),
            lambda: CountingResolver([server], timeout=0.2),
            [(0, request(client_address="192.0.2.10"))])
    assert decisions[0].action.endswith("in 300 seconds")
    assert decisions[0].fields == (("spf", "temperror"), ("dns", "timeout"))
    assert list(triplets.data) == ["192.0.2.0/alice@example.org/bob@example.com"]


def test_spf_dns_failures_are_logged_once_a_minute(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """As a DNS list's failure: a warning says SPF's DNS is failing, at most
    once per DNS_WARN_INTERVAL_SECONDS (every decision line says dns=timeout)."""
    ticks = [1000.0]
    monkeypatch.setattr(clock, "monotonic", lambda: ticks[0])
    steps = [(0, request(client_address="192.0.2.10")),
             (1, request(client_address="192.0.2.11", sender="x@other.example")),
             (2, request(client_address="192.0.2.12", sender="y@third.example"))]
    with silent_dns_server() as server:
        async def main() -> list[Decision]:
            policy, _, _ = make_policy(spf_config(),
                                       resolver=Resolver([server], timeout=0.2))
            decisions = []
            for offset, (_, req) in zip((0, 30, limits.DNS_WARN_INTERVAL_SECONDS), steps,
                                        strict=True):
                ticks[0] = 1000.0 + offset
                decisions.append(await policy.decide(req))
            await policy.aclose()
            return decisions

        with caplog.at_level("WARNING"):
            decisions = run(main())
    assert [dict(d.fields)["dns"] for d in decisions] == ["timeout"] * 3
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"SPF of {domain}: DNS did not answer (TXT {domain}: timeout): SPF results are "
        "temperror, senders are keyed and delayed as without SPF"
        for domain in ("example.org", "third.example")]


def test_the_decision_line_says_what_spf_contributed() -> None:
    line = logsetup.format_decision(
        request(), Decision("DUNNO", "passed",
                            fields=(("spf", "pass"), ("client_key", "spf:example.org"))))
    assert line.endswith(" queue_id=- spf=pass client_key=spf:example.org")
    line = logsetup.format_decision(
        request(sender=""), Decision("DUNNO", "new", fields=(("spf", "temperror"),
                                                              ("dns", "timeout"))))
    assert line.endswith(" queue_id=- spf=temperror dns=timeout")


@pytest.mark.parametrize(("text", "message"), [
    ("greylist_delay_spf_pass = 10m\n", "must not be longer than greylist_delay"),
    ("client_key = spf\ndns_timeout = 10s\n", "must be shorter than decision_timeout"),
    ("spf_fallback_client_key = spf\n", "expected one of: subnet, host, smart"),
    ("greylist_delay_spf_pass = soon\n", "bad time value"),
])
def test_bad_spf_settings(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "policyd.cf", text)
    with pytest.raises(ConfigError, match=message):
        PolicydConfig.from_file(path)


def test_spf_settings_and_uses_dns(tmp_path: Path) -> None:
    assert not PolicydConfig().uses_dns
    cfg = PolicydConfig.from_file(write(tmp_path / "p.cf", "client_key = spf\n"
                                        "spf_fallback_client_key = smart\n"
                                        "greylist_delay_spf_pass = 1m\n"))
    assert (cfg.client_key, cfg.spf_fallback_client_key, cfg.greylist_delay_spf_pass) == (
        "spf", "smart", 60)
    assert cfg.uses_dns and cfg.spf_timeout == 6.0
    assert "greylist_delay_spf_pass = 60\n" in cfg.render()
    assert "greylist_delay_spf_pass = \n" in PolicydConfig().render()
    assert PolicydConfig.from_file(write(tmp_path / "q.cf", "greylist_delay_spf_pass = 0\n")) \
        .uses_dns


def test_a_listed_client_waits_the_longer_delay_even_when_spf_passes(
        nsd_factory: Any) -> None:
    """SPF and the DNS lists together: both are asked for a new triplet (at
    the same time), a listed client waits greylist_delay_listed although its
    sender's SPF passes, an unlisted one is let through (selective
    greylisting), and each decision line says what both contributed."""
    from policyd.dnsbl import parse_sites

    server = nsd_factory({"example.org": ZONE, "bl.test": "10.2.0.192 IN A 127.0.0.2\n"})
    cfg = config(auto_whitelist_clients=0, greylist_delay_spf_pass=60,
                 dnsbl_sites=parse_sites(["bl.test"]), dnsbl_greylist_threshold=1,
                 greylist_delay_listed=1800)
    listed = request(client_address="192.0.2.10")
    unlisted = request(client_address="198.51.100.20", client_name="unknown")
    (first, second), _, _, resolver = scenario(
        cfg, lambda: CountingResolver([server.server]), [(0, listed), (1, unlisted)])
    assert first.action == "DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 1800 seconds"
    assert (first.dns_score, dict(first.fields)["spf"]) == (1, "pass")
    assert (second.action, second.reason, second.dns_score) == ("DUNNO", "unlisted", 0)
    assert logsetup.format_decision(listed, first).endswith(" spf=pass dns_score=1")
    assert ("example.org", "TXT") in resolver.asked
    assert ("10.2.0.192.bl.test", "A") in resolver.asked


def test_with_client_key_spf_the_lists_are_asked_within_the_one_dns_bound(
        nsd_factory: Any) -> None:
    """client_key = spf asks SPF before the stores and the DNS lists after
    them (only for a new or pending triplet): the lists get what is left of
    the decision's one DNS bound (dns_bound, SPF's), never a second
    dns_timeout on top.  Here SPF takes its whole bound (a ptr mechanism
    whose names' addresses never come back), so the lists, although their
    server answers at once, are not waited for: the score is unknown."""
    from policyd.dnsbl import parse_sites

    names = "".join(f'10 IN PTR h{i}.slow.test.\n' for i in range(5))
    zones = {"example.org": '@ TXT "v=spf1 ptr:slow.test -all"\n',
             "2.0.192.in-addr.arpa": names,
             "bl.test": "10.2.0.192 IN A 127.0.0.2\n"}
    server = nsd_factory(zones)
    cfg = spf_config(dnsbl_sites=parse_sites(["bl.test"]), dns_timeout=1)
    assert cfg.dns_bound == cfg.spf_timeout == 3.0
    with silent_dns_server() as silent:
        # nsd refuses slow.test (not its zone): the resolver then asks the
        # silent server, which costs a whole dns_timeout per name.
        (decision,), _, _, resolver = scenario(
            cfg, lambda: CountingResolver([server.server, silent], timeout=1.0),
            [(0, request(client_address="192.0.2.10"))])
    assert ("h0.slow.test", "A") in resolver.asked
    assert dict(decision.fields)["spf"] == "temperror"
    assert (decision.dns_score, decision.dns) == (None, "timeout")
    assert decision.action.endswith("in 300 seconds")  # greylisted as without DNS


def test_dns_bound_is_what_the_code_waits(tmp_path: Path) -> None:
    """SPF's bound covers the lists too; the lists alone, one query."""
    def bound(text: str) -> float:
        return PolicydConfig.from_file(write(tmp_path / "b.cf", text)).dns_bound

    assert bound("client_key = spf\ndnsbl_sites = bl.example\ndns_timeout = 6\n") == 18.0
    assert bound("greylist_delay_spf_pass = 1m\ndnsbl_sites = bl.example\n") == 6.0
    assert bound("dnsbl_sites = bl.example\n") == 2.5
    assert bound("client_key = spf\n") == 6.0
    with pytest.raises(ConfigError, match=r"DNS may take up to 21s of a decision \(3 x "
                       r"dns_timeout for SPF, the DNS lists within it\): it must be shorter "
                       r"than decision_timeout \(20s\)"):
        bound("client_key = spf\ndnsbl_sites = bl.example\ndns_timeout = 7\n")


def test_an_outage_costs_the_first_recipient_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """client_key = spf with DNS lists, DNS down: the first recipient waits
    for SPF's query and the lists' (each fails once), the other recipients
    of the message get the remembered failures without asking again; after
    DNS_FAILURE_CACHE_SECONDS DNS is asked again."""
    from policyd.dnsbl import parse_sites

    cfg = spf_config(dnsbl_sites=parse_sites(["bl.test", "wl.test*-1"]), dns_timeout=1)
    recipients = [f"r{i}@example.com" for i in range(5)]
    with silent_dns() as silent:
        async def main() -> list[tuple[Decision, int]]:
            policy, _, _ = make_policy(cfg, resolver=Resolver([silent.server], timeout=0.2))
            seen = []
            with freeze_time(T0, real_asyncio=True) as frozen:
                for offset, rcpt in [(0, r) for r in recipients] + [
                        (limits.DNS_FAILURE_CACHE_SECONDS + 1, "late@example.com")]:
                    frozen.move_to(datetime.fromtimestamp(START + offset, tz=UTC))
                    decision = await policy.decide(request(client_address="192.0.2.10",
                                                           recipient=rcpt))
                    seen.append((decision, silent.queries()))
            await policy.aclose()
            return seen

        seen = run(main())
    first = seen[0][1]
    assert first >= 3  # SPF's TXT query and one per list
    assert [asked for _, asked in seen[:5]] == [first] * 5
    assert seen[5][1] > first  # the failures are forgotten after the interval
    for decision, _ in seen:
        assert decision.action.endswith("in 300 seconds")
        assert dict(decision.fields)["spf"] == "temperror"
        assert decision.dns == "timeout"

"""policyd.dns against a real DNS server (nsd on a loopback port)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from memtable import clock
from memtable.errors import ConfigError
from policyd import limits
from policyd.config import PolicydConfig
from policyd.dns import Resolver, Status
from tests.dnslab import Nsd, silent_dns, silent_dns_server

ZONE = """
@ 60 IN TXT "v=spf1 ip4:192.0.2.0/24 " "-all"
@ 60 IN MX 10 mail
@ 60 IN MX 5 mx2
mail 60 IN A 192.0.2.10
mx2 60 IN AAAA 2001:db8::1
"""


def test_answers_by_kind(nsd_factory: Callable[[Mapping[str, str]], Nsd]) -> None:
    nsd = nsd_factory({"example.org": ZONE})

    async def ask() -> list[tuple[Status, tuple[str, ...]]]:
        r = Resolver([nsd.server], timeout=2.0)
        queries = [("example.org", "TXT"), ("example.org", "MX"), ("mail.example.org", "A"),
                   ("mx2.example.org", "AAAA"), ("nope.example.org", "A"),
                   ("mail.example.org", "TXT"), ("a..b.example.org", "A"), ("elsewhere.test", "A")]
        return [((a := await r.query(n, t)).status, a.records) for n, t in queries]

    assert asyncio.run(ask()) == [
        (Status.OK, ("v=spf1 ip4:192.0.2.0/24 -all",)),   # strings joined (RFC 7208 3.3)
        (Status.OK, ("mx2.example.org", "mail.example.org")),  # by preference
        (Status.OK, ("192.0.2.10",)),
        (Status.OK, ("2001:db8::1",)),
        (Status.NXDOMAIN, ()),
        (Status.NODATA, ()),
        (Status.FAILURE, ()),   # empty label: never sent
        (Status.FAILURE, ()),   # REFUSED by an authoritative server
    ]


def test_answers_are_cached(nsd_factory: Callable[[Mapping[str, str]], Nsd]) -> None:
    nsd = nsd_factory({"example.org": ZONE})

    async def ask() -> tuple[Status, Status]:
        r = Resolver([nsd.server], timeout=2.0)
        first = await r.query("mail.example.org", "A")
        nsd.proc.terminate()
        nsd.proc.wait(5)
        return first.status, (await r.query("mail.example.org", "A")).status

    assert asyncio.run(ask()) == (Status.OK, Status.OK)


# What one cached answer may cost in memory: policyd's cache holds
# DNS_CACHE_MAX_ENTRIES of them per process.
CACHED_ANSWER_MAX_BYTES = 1500


def test_a_cached_answer_costs_hundreds_of_bytes_not_the_response(
        nsd_factory: Callable[[Mapping[str, str]], Nsd]) -> None:
    # A DNS list query per new client (the typical load): every answer
    # stays cached for its TTL, so its size times DNS_CACHE_MAX_ENTRIES is
    # what the cache may hold.  dnspython's own cache keeps whole responses
    # (~4 KiB each): it must not grow with them.
    listed = "".join(f"{i}.0.2.1 3600 IN A 127.0.0.2\n" for i in range(0, 250, 10))
    nsd = nsd_factory({"bl.example.org": listed})
    names = [f"{i % 250}.{i // 250}.2.1.bl.example.org" for i in range(2000)]

    async def ask() -> tuple[int, list[Status]]:
        r = Resolver([nsd.server], timeout=2.0)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            statuses = [(await r.query(name, "A")).status for name in names]
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert all(r.cached(name, "A") is not None for name in names)  # all kept
        return used, statuses

    used, statuses = asyncio.run(ask())
    assert statuses.count(Status.OK) == 25  # x.0.2.1 listed for x = 0, 10, ...
    assert statuses.count(Status.NXDOMAIN) == len(names) - 25
    assert used / len(names) < CACHED_ANSWER_MAX_BYTES


def test_a_server_that_never_answers_costs_the_timeout_and_is_a_failure() -> None:
    with silent_dns_server() as server:
        async def ask() -> tuple[Status, str, float]:
            r = Resolver([server], timeout=0.5)
            start = time.monotonic()
            answer = await r.query("example.org", "TXT")
            return answer.status, answer.reason, time.monotonic() - start

        status, reason, took = asyncio.run(ask())
    assert (status, reason) == (Status.FAILURE, "timeout")
    assert took >= 0.5  # it did wait for the server, and then gave up
    assert took < 0.5 + 2.0  # bounded (a generous margin for a busy machine)


def test_cached_answers_last_their_dns_ttl(nsd_factory: Callable[[Mapping[str, str]], Nsd],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers are kept under their text name for the record's TTL; "no
    such name" for the SOA's negative TTL (60 s in tests.dnslab's zones)."""
    nsd = nsd_factory({"example.org": ZONE + "long 3600 IN A 192.0.2.11\n"})
    now = [time.time()]
    monkeypatch.setattr(clock, "now", lambda: now[0])

    start = now[0]
    names = [("mail.example.org", "A"), ("long.example.org", "A"), ("nope.example.org", "A"),
             ("mail.example.org", "TXT")]

    def statuses(r: Resolver) -> list[Status | None]:
        return [None if (a := r.cached(n, t)) is None else a.status for n, t in names]

    async def ask() -> list[list[Status | None]]:
        r = Resolver([nsd.server], timeout=2.0)
        seen = [statuses(r)]  # nothing asked yet
        for n, t in names:
            await r.query(n, t)
        for offset in (50, 70):
            now[0] = start + offset
            seen.append(statuses(r))
        return seen

    before, within, after = asyncio.run(ask())
    assert before == [None] * 4
    assert within == [Status.OK, Status.OK, Status.NXDOMAIN, Status.NODATA]
    assert after == [None, Status.OK, None, None]


def test_a_failure_is_cached_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    """During an outage a name costs one timeout per DNS_FAILURE_CACHE_SECONDS,
    not one per request: the next query answers FAILURE at once, without
    asking; after the interval the server is asked again."""
    now = [time.time()]
    monkeypatch.setattr(clock, "now", lambda: now[0])
    start = now[0]

    with silent_dns() as silent:
        async def ask() -> list[tuple[Status, str, int]]:
            r = Resolver([silent.server], timeout=0.5)
            seen = []
            for offset in (0, 1, limits.DNS_FAILURE_CACHE_SECONDS - 1,
                           limits.DNS_FAILURE_CACHE_SECONDS + 1):
                now[0] = start + offset
                answer = await r.query("example.org", "TXT")
                seen.append((answer.status, answer.reason, silent.queries()))
            return seen

        seen = asyncio.run(ask())
    asked_first = seen[0][2]
    assert asked_first >= 1
    assert seen == [(Status.FAILURE, "timeout", asked_first)] * 3 + [
        (Status.FAILURE, "timeout", seen[3][2])]
    assert seen[3][2] > asked_first  # asked again after the interval


@pytest.mark.parametrize(("value", "servers"), [
    ("127.0.0.1", ((("127.0.0.1", 53),))),
    ("127.0.0.1:5353, [::1]:54, ::1", (("127.0.0.1", 5353), ("::1", 54), ("::1", 53))),
    ("127.0.0.1:0000053", (("127.0.0.1", 53),)),
])
def test_dns_servers_are_addresses_with_ports(tmp_path: Path, value: str,
                                              servers: tuple[tuple[str, int], ...]) -> None:
    cf = tmp_path / "policyd.cf"
    cf.write_text(f"dns_servers = {value}\n")
    assert PolicydConfig.from_file(str(cf)).dns_servers == servers


@pytest.mark.parametrize(("value", "message"), [
    ("ns.example.org", '"ns.example.org": not an IP address'),
    ("127.0.0.1:0", '"127.0.0.1:0": bad port'),
    ("127.0.0.1:65536", '"127.0.0.1:65536": bad port'),
    # Leading zeros hide no port above 65535; nor does a number of 5,000 digits.
    ("127.0.0.1:0000099999", '"127.0.0.1:0000099999": bad port'),
    ("127.0.0.1:" + "9" * 5000, "bad port"),
    ("[::1", '"[::1": expected [address]:port'),
])
def test_bad_dns_servers_are_one_line_with_file_and_line(tmp_path: Path, value: str,
                                                         message: str) -> None:
    cf = tmp_path / "policyd.cf"
    cf.write_text(f"dns_servers = {value}\n")
    with pytest.raises(ConfigError) as info:
        PolicydConfig.from_file(str(cf))
    assert str(info.value).startswith(f"{cf}, line 1: dns_servers = ")
    assert message in str(info.value)

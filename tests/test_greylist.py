"""The greylisting policy end to end over real Store threads: in-memory
tables for time travel (freezegun), real memcached for build_policy."""

from __future__ import annotations

import email.utils
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from policyd.api import Decision, PolicyFailure
from policyd.greylist import GreylistPolicy, TripletRecord, build_policy, expand
from policyd.logsetup import format_decision
from policyd.reputation import RECORD_REFRESH_INTERVAL, ClientRecord, postscreen_proves_return
from policyd.whitelist import Whitelists
from tests.conftest import Memcached, free_port
from tests.greylist_helpers import DictTable, config, make_policy, request, run, write

T0 = "2024-05-01 12:00:00"
START = 1714564800  # T0 as a UNIX time
HOUR = 3600
DAY = 86400


class NoExpiryTable(DictTable):
    """Keeps entries forever, like an lmdb backup table."""

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        super().update(key, value, None)


def scenario(cfg: Any, steps: list[tuple[int, dict[str, str]]], **kw: Any) \
        -> tuple[list[Decision], DictTable, DictTable]:
    """Run requests at START + offset seconds; return decisions and tables."""
    decisions: list[Decision] = []

    async def main() -> tuple[DictTable, DictTable]:
        policy, triplets, clients = make_policy(cfg, **kw)
        with freeze_time(T0) as frozen:
            for offset, req in steps:
                frozen.move_to(datetime.fromtimestamp(START + offset, tz=UTC))
                decisions.append(await policy.decide(req))
        await policy.aclose()
        return triplets, clients

    triplets, clients = run(main())
    return decisions, triplets, clients


def test_new_early_retry_pass_and_known() -> None:
    r = request(instance="a1")
    (new, early, passed, again), triplets, clients = scenario(
        config(), [(0, r), (100, r), (301, request(instance="a2")), (400, request(instance="a3"))])
    assert new == Decision("DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 300 seconds",
                           "new")
    assert early == Decision("DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 200 seconds",
                             "early-retry")
    date = email.utils.formatdate(START + 301, localtime=True)
    assert passed == Decision(
        f"PREPEND X-Greylist: delayed 301 seconds by policyd at mx.example.net; {date}",
        "passed", delay=301.0)
    assert again == Decision("DUNNO", "passed")
    key = "192.0.2.0/alice@example.org/bob@example.com"
    assert triplets.data[key][0] == f"{START},{START + 301},1,{START + 301}"
    assert triplets.data[key][1] == START + 301 + 35 * DAY  # ttl max_age from the pass
    # two defers, one counted pass
    assert clients.data["192.0.2.0"][0] == f"{START},{START + 301},2,1,{START + 301}"


def test_early_retry_keeps_first_seen_and_new_ttl_is_retry_window() -> None:
    r = request()
    _, triplets, _ = scenario(config(), [(0, r), (200, r), (299, r)])
    value, expires = triplets.data["192.0.2.0/alice@example.org/bob@example.com"]
    assert TripletRecord.parse(value) == TripletRecord(START, START)
    assert expires == START + 2 * DAY


# Each record type with the error text its parse raises.
_RECORD_ERRORS = {TripletRecord: "malformed triplet record", ClientRecord: "client record"}


@pytest.mark.parametrize(("kind", "value", "expected"), [
    (TripletRecord, "1,2,0,0", TripletRecord(1, 2)),
    (TripletRecord, "1,2,1,5", TripletRecord(1, 2, True, 5)),
    (TripletRecord, "007,2,0,0", TripletRecord(7, 2)),
    *((TripletRecord, bad, None) for bad in (
        "1,2,2,0", "1,2,0,", "1,2", "1,2,1", "1,2,0,0,0", "-1,2,0,0", "1,2,0,0\n", " 1,2,0,0",
        "\u0661,2,0,0",  # a non-ASCII digit
        "1," * 100 + "0")),
    (ClientRecord, "1,2,3,4,5", ClientRecord(1, 2, 3, 4, 5)),
    *((ClientRecord, bad, None) for bad in (
        "1,2,3,4", "1,2,3,4,5,6", "1,2,3,4,x", "1,2,3,4,5\n", "\u0661,2,3,4,5", "1,2,3,4,+5",
        "9" * 201 + ",1,1,1,1")),  # the last: over RECORD_MAX_CHARS
])
def test_record_parse(kind: type[TripletRecord] | type[ClientRecord], value: str,
                      expected: TripletRecord | ClientRecord | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match=_RECORD_ERRORS[kind]):
            kind.parse(value)
    else:
        assert kind.parse(value) == expected


def test_header_off_and_text_expansion() -> None:
    cfg = config(greylist_header=False, greylist_action="450",
                 greylist_text="4.7.1 see https://help/%r.html (%s s) %x %%")
    (new, passed), _, _ = scenario(cfg, [(0, request()), (300, request())])
    assert new.action == "450 4.7.1 see https://help/example.com.html (300 s) %x %%"
    assert passed == Decision("DUNNO", "passed", delay=300.0)
    assert expand("%t%t%s", {"t": "%s", "s": "1"}) == "%s%s1"  # one pass only


def test_one_header_per_message_with_several_recipients() -> None:
    steps = [(0, request(recipient="a@example.com")), (0, request(recipient="b@example.com")),
             (400, request(recipient="a@example.com", instance="m1")),
             (400, request(recipient="b@example.com", instance="m1"))]
    decisions, _, _ = scenario(config(), steps)
    assert decisions[2].action.startswith("PREPEND X-Greylist: delayed 400 seconds")
    assert decisions[3] == Decision("DUNNO", "passed", delay=400.0)


@pytest.mark.parametrize("table", [DictTable, NoExpiryTable])
def test_missed_retry_window_starts_again(table: type[DictTable]) -> None:
    r = request()
    decisions, _, _ = scenario(config(), [(0, r), (2 * DAY + 1, r), (2 * DAY + 301, r)],
                               triplets=table("dict:triplets"))
    assert [d.reason for d in decisions] == ["new", "new", "passed"]
    assert decisions[2].delay == 300.0


@pytest.mark.parametrize("table", [DictTable, NoExpiryTable])
def test_passed_triplet_expires_max_age_after_last_seen(table: type[DictTable]) -> None:
    r = request()
    max_age = 10 * DAY
    steps = [(0, r), (300, r),
             (300 + max_age - HOUR, r),  # seen again: lifetime starts again
             (300 + 2 * max_age - 2 * HOUR, r),  # still good
             (300 + 3 * max_age, r)]  # unseen for more than max_age: new
    decisions, _, _ = scenario(config(max_age=max_age), steps, triplets=table("dict:t"))
    assert [d.reason for d in decisions] == ["new", "passed", "passed", "passed", "new"]


def test_known_triplet_is_rewritten_at_most_once_an_interval() -> None:
    r = request()
    steps = [(0, r), (300, r)] + [(300 + i * 60, r) for i in range(1, 30)]
    _, triplets, _ = scenario(config(), steps)
    assert triplets.updates == 2  # new and pass; 29 later passes within the hour
    _, triplets, _ = scenario(config(), [*steps, (300 + RECORD_REFRESH_INTERVAL, r)])
    assert triplets.updates == 3


@pytest.mark.parametrize(("v4", "v6", "first", "retry", "same"), [
    (24, 64, "192.0.2.10", "192.0.2.200", True),
    (24, 64, "192.0.2.10", "192.0.3.10", False),
    (16, 64, "192.0.2.10", "192.0.3.10", True),
    (32, 64, "192.0.2.10", "192.0.2.11", False),
    (24, 64, "2001:db8:0:1::5", "2001:db8:0:1:ffff::9", True),
    (24, 64, "2001:db8:0:1::5", "2001:db8:0:2::5", False),
    (24, 48, "2001:db8:0:1::5", "2001:db8:0:2::5", True),
])
def test_subnet_masking_decides_who_retries(v4: int, v6: int, first: str, retry: str,
                                            same: bool) -> None:
    cfg = config(ipv4_prefix=v4, ipv6_prefix=v6)
    decisions, _, _ = scenario(cfg, [(0, request(client_address=first)),
                                     (400, request(client_address=retry))])
    assert decisions[1].reason == ("passed" if same else "new")


def test_smart_client_key() -> None:
    cfg = config(client_key="smart")
    a = request(client_address="198.51.100.5", client_name="mail-a.outbound.protection.outlook.com")
    b = request(client_address="203.0.113.9", client_name="mail-b.eur.protection.outlook.com")
    decisions, triplets, _ = scenario(cfg, [(0, a), (400, b)])
    assert [d.reason for d in decisions] == ["new", "passed"]
    assert "outlook.com/alice@example.org/bob@example.com" in triplets.data
    # unverified names fall back to the subnet
    c = request(client_address="198.51.100.5", client_name="unknown")
    d = request(client_address="203.0.113.9", client_name="unknown")
    decisions, triplets, _ = scenario(cfg, [(0, c), (400, d)])
    assert [d.reason for d in decisions] == ["new", "new"]
    assert "198.51.100.0/alice@example.org/bob@example.com" in triplets.data


@pytest.mark.parametrize(("first", "retry"), [
    ({"sender": "prvs=0123abcdef=alice@example.org"},
     {"sender": "prvs=9876fedcba=alice@example.org"}),
    ({"sender": "list+bounce-1@example.org"}, {"sender": "LIST+bounce-2@Example.org"}),
    ({"sender": "bounce-1234@example.org"}, {"sender": "bounce-5678@example.org"}),
    ({"recipient": "bob+a@example.com"}, {"recipient": "Bob+b@EXAMPLE.com"}),
    ({"sender": ""}, {"sender": "<>"}),
])
def test_normalised_variants_share_a_triplet(first: dict[str, str],
                                             retry: dict[str, str]) -> None:
    decisions, _, _ = scenario(config(), [(0, request(**first)), (400, request(**retry))])
    assert [d.reason for d in decisions] == ["new", "passed"]


def test_auto_whitelist_after_n_passes_counted_once_an_hour() -> None:
    def trip(n: int) -> dict[str, str]:
        return request(recipient=f"user{n}@example.com")

    steps = [
        (0, trip(1)), (300, trip(1)),  # pass 1 counted
        (400, trip(2)), (700, trip(2)),  # passes within the hour: not counted
        (800, trip(3)),  # still greylisted
        (2 * HOUR, trip(3)),  # pass 2 counted (an hour after the first)
        (2 * HOUR + 1, trip(4)),  # auto-whitelisted now
    ]
    decisions, _, clients = scenario(config(auto_whitelist_clients=2), steps)
    assert [d.reason for d in decisions] == [
        "new", "passed", "new", "passed", "new", "passed", "auto-whitelisted"]
    assert clients.data["192.0.2.0"][0].split(",")[3] == "2"
    # 0 turns it off
    decisions, _, _ = scenario(config(auto_whitelist_clients=0), steps)
    assert decisions[-1].reason == "new"


def test_privacy_stores_no_addresses() -> None:
    cfg = config(privacy=True, privacy_salt="salt", client_key="host")
    decisions, triplets, clients = scenario(cfg, [(0, request()), (400, request())])
    assert [d.reason for d in decisions] == ["new", "passed"]
    stored = " ".join(f"{k} {v}" for t in (triplets, clients) for k, (v, _) in t.data.items())
    for secret in ("192.0.2", "alice", "bob", "example", "@"):
        assert secret not in stored
    assert all(len(k) == 64 for t in (triplets, clients) for k in t.data)


# postscreen cache values as postscreen writes them (pregreet;dnsbl;pipelining;
# non_smtp;bare_newline expiry times, 0 never passed, 1 disabled), read at START.
PREGREET = START + DAY  # postscreen_greet_ttl 1d
DNSBL = START + HOUR  # postscreen_dnsbl_max_ttl 1h
DEEP = START + 30 * DAY  # postscreen_*_ttl 30d


@pytest.mark.parametrize(("value", "came_back"), [
    # Postfix's defaults: only pregreet runs, passed on the first connection.
    (f"{PREGREET};1;1;1;1", False),
    (f"{PREGREET};{DNSBL};1;1;1", False),  # pregreet and DNSBL passes alone
    (f"{PREGREET};{DNSBL};0;0;0", False),  # after-220 tests on, not passed yet
    (f"{PREGREET};1;{DEEP};1;1", True),  # pipelining passed: it came back
    (f"{PREGREET};{DNSBL};{DEEP};{DEEP};{DEEP}", True),
    (f"1;1;1;1;{DEEP}", True),  # bare_newline alone
    (f"{PREGREET};1;1;{DEEP};0", True),  # non_smtp passed, bare_newline turned on since
    (f"{PREGREET};1;{START};1;1", True),  # expires this second: postscreen still counts it
    (f"{PREGREET};1;{START - 1};1;1", False),  # expired: postscreen tests it again
    (f"{START - 1};{START - 1};{DEEP};1;1", True),  # expired pregreet/DNSBL do not matter
    # postscreen_dnsbl_allowlist_threshold: every test gets the DNSBL expiry
    # (or a little less: set when the DNS reply came), none was run.
    (f"{DNSBL};{DNSBL};{DNSBL};{DNSBL};{DNSBL}", False),
    (f"{PREGREET};{DNSBL};{DNSBL - 2};{DNSBL - 2};{DNSBL - 2}", False),
    (f"{PREGREET};{DNSBL};{DEEP};{DNSBL};{DNSBL}", True),  # a real pass kept its expiry
    (f"{PREGREET}", False),  # an older postscreen: missing tests disabled
    (f"{PREGREET};1;{DEEP}", True),
    ("1;1;1;1;1", False),
    (f"{PREGREET};1;{DEEP};1;1;7", True),  # fields of a newer postscreen ignored
])
def test_postscreen_entry_proves_return_only_after_an_after_220_test(
        value: str, came_back: bool) -> None:
    assert postscreen_proves_return(value, START, "192.0.2.10") is came_back


@pytest.mark.parametrize("value", ["garbage", f"{PREGREET};1;x;1;1", "", "1;-1;1;1;1",
                                   ";".join([str(DEEP)] * 60)])
def test_malformed_postscreen_entry_proves_nothing(value: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert postscreen_proves_return(value, START, "192.0.2.10") is False
    assert "ignoring postscreen cache entry for 192.0.2.10" in caplog.text


def test_absent_postscreen_entry_proves_nothing() -> None:
    assert postscreen_proves_return(None, START) is False


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"protocol_state": "MAIL"}, "not-rcpt"),
    ({"protocol_state": "DATA"}, "not-rcpt"),
    ({"protocol_state": "END-OF-MESSAGE"}, "not-rcpt"),
    ({"protocol_state": ""}, "not-rcpt"),
    ({"sasl_username": "alice"}, "authenticated"),
    ({"client_address": "bogus"}, "bad-request"),
    ({"recipient": ""}, "bad-request"),
])
def test_requests_that_are_not_greylisted(attrs: dict[str, str], reason: str) -> None:
    decisions, triplets, clients = scenario(config(), [(0, request(**attrs))])
    assert decisions == [Decision("DUNNO", reason)]
    assert triplets.lookups == clients.lookups == 0


def test_whitelisted_clients_and_recipients(tmp_path: Path) -> None:
    wl = Whitelists.load([write(tmp_path / "c", "example.org\n198.51.100.0/24\n")],
                         [write(tmp_path / "r", "postmaster@\n")])
    steps = [(0, request(client_name="mx.example.org")),
             (0, request(client_name="unknown", client_address="198.51.100.1")),
             (0, request(client_name="unknown", recipient="postmaster@example.com")),
             (0, request(client_name="unknown"))]
    decisions, triplets, _ = scenario(config(), steps, whitelist=wl)
    assert [d.reason for d in decisions] == ["whitelisted"] * 3 + ["new"]
    # Which list matched, in postgrey's words.
    assert [d.detail for d in decisions[:3]] == ["client whitelist"] * 2 + [
        "recipient whitelist"]
    assert triplets.lookups == 1
    # The log line: the reason stays one greppable word, the detail follows.
    line = format_decision(steps[2][1], decisions[2])
    assert re.findall(r"reason=[a-z-]*", line) == ["reason=whitelisted"]
    assert line.endswith(' detail="recipient whitelist"'), line


def test_reload_reads_whitelists_again(tmp_path: Path) -> None:
    path = tmp_path / "c"
    wl = Whitelists.load([write(path, "old.example\n")], [])

    async def main() -> list[str]:
        policy, _, _ = make_policy(config(), whitelist=wl)
        path.write_text("new.example\n")
        policy.reload()
        reasons = [(await policy.decide(request(client_name=n))).reason
                   for n in ("mx.new.example", "mx.old.example")]
        await policy.aclose()
        return reasons

    assert run(main()) == ["whitelisted", "new"]


# --- build_policy over real memcached -----------------------------------------

def _cf(tmp_path: Path, name: str, server: str, extra: str = "") -> str:
    return "memcache:" + write(tmp_path / f"{name}.cf",
                               f"memcache = {server}\ntimeout = 1\nmax_try = 1\n{extra}")


def test_build_policy_with_real_memcached(tmp_path: Path, memcached: Memcached) -> None:
    cfg = config(triplet_table=_cf(tmp_path, "t", memcached.spec, "key_format = t:%s\n"),
                 client_table=_cf(tmp_path, "c", memcached.spec, "key_format = c:%s\n"))

    async def main() -> Decision:
        policy = build_policy(cfg)
        assert isinstance(policy, GreylistPolicy)
        decision = await policy.decide(request())
        await policy.aclose()
        return decision

    assert run(main()).reason == "new"
    stored = memcached.meta("t:192.0.2.0/alice@example.org/bob@example.com")
    assert stored is not None and str(stored["value"]).endswith(",0")
    assert 0 < int(stored["ttl"]) <= 2 * DAY  # type: ignore[call-overload]
    client = memcached.meta("c:192.0.2.0")
    assert client is not None and str(client["value"]).split(",")[2] == "1"


@pytest.mark.parametrize("privacy", [False, True])
def test_a_slash_in_an_address_does_not_share_a_triplet(
        tmp_path: Path, memcached: Memcached, privacy: bool) -> None:
    """sender x@a.org + recipient y/z@example.com passes; sender x@a.org/y +
    recipient z@example.com is another triplet, greylisted on its first
    request (it was DUNNO when both had one key, issue 15); report and
    cleanup walk both records from the lmdb backup."""
    backup = f"backup = lmdb:{tmp_path}/triplets\n"
    cfg = config(triplet_table=_cf(tmp_path, "t", memcached.spec, "key_format = t:%s\n" + backup),
                 client_table=_cf(tmp_path, "c", memcached.spec,
                                  f"key_format = c:%s\nbackup = lmdb:{tmp_path}/clients\n"),
                 postscreen_cache=_cf(tmp_path, "ps", memcached.spec,
                                      "key_format = postscreen:%s\n"),
                 privacy=privacy, privacy_salt="s3cret")
    one = request(sender="x@a.org", recipient="y/z@example.com")
    other = request(sender="x@a.org/y", recipient="z@example.com")

    async def main() -> list[Decision]:
        policy = build_policy(cfg)
        out = []
        with freeze_time(T0) as frozen:
            out.append(await policy.decide(one))
            frozen.move_to(datetime.fromtimestamp(START + 301, tz=UTC))
            out.append(await policy.decide(one))
            out.append(await policy.decide(other))
        await policy.aclose()
        return out

    first, passed, other_first = run(main())
    assert (first.reason, passed.reason, other_first.reason) == ("new", "passed", "new")
    assert other_first.action.startswith("DEFER_IF_PERMIT")
    from policyd.cleanup import cleanup
    from policyd.storewalk import WalkTables
    with WalkTables.open(cfg, read_write=True) as stores:
        records = sorted((e.triplet.passed, e.key) for e in stores.walk("triplets", 10)
                         if e.triplet is not None)
        assert [passed for passed, _ in records] == [False, True]
        if not privacy:
            assert [key for _, key in records] == ["192.0.2.0/x@a.org%2fy/z@example.com",
                                                   "192.0.2.0/x@a.org/y%2fz@example.com"]
        counts = cleanup(stores, cfg, START + 400 * DAY)
        assert counts["triplets"].deleted == 2
        assert list(stores.walk("triplets", 10)) == []
    for _, key in records:
        assert memcached.meta(f"t:{key}") is None


def test_store_failure_is_raised_for_the_server(tmp_path: Path) -> None:
    """The policy does not choose the answer to a store failure: it raises,
    and the server answers as failure_action says (test_server.py)."""
    down = f"inet:127.0.0.1:{free_port()}"  # nobody listens: connection refused
    cfg = config(triplet_table=_cf(tmp_path, "t", down), client_table=_cf(tmp_path, "c", down),
                 postscreen_cache=_cf(tmp_path, "ps", down), failure_action="disconnect")

    async def main() -> None:
        policy = build_policy(cfg)
        try:
            await policy.decide(request())
        finally:
            await policy.aclose()

    with pytest.raises(PolicyFailure) as failure:
        run(main())
    assert failure.value.reason == "store-failure"
    assert f"memcache server {down}" in str(failure.value)
    assert "Connection refused" in str(failure.value)


def test_build_policy_reports_bad_whitelist(tmp_path: Path) -> None:
    from memtable.errors import ConfigError

    with pytest.raises(ConfigError, match="nope"):
        build_policy(config(whitelist_clients=(str(tmp_path / "nope"),)))


def test_malformed_and_future_records(caplog: pytest.LogCaptureFixture) -> None:
    key = "192.0.2.0/alice@example.org/bob@example.com"
    triplets, clients = DictTable("dict:t"), DictTable("dict:c")
    triplets.data[key] = ("1,2", None)
    clients.data["192.0.2.0"] = ("x,y,z,1,2", None)
    with caplog.at_level(logging.WARNING):
        decisions, _, _ = scenario(config(), [(0, request())], triplets=triplets,
                                   clients=clients)
    assert decisions[0].reason == "new"
    assert "malformed triplet record" in caplog.text
    assert "malformed client record" in caplog.text
    assert clients.data["192.0.2.0"][0] == f"{START},{START},1,0,0"
    # first_seen in the future (another host's clock): counts from now
    triplets.data[key] = (f"{START + DAY},{START + DAY},0,0", None)
    decisions, _, _ = scenario(config(), [(0, request()), (301, request())],
                               triplets=triplets)
    assert [d.reason for d in decisions] == ["new", "passed"]
    # a passed triplet from a host a little ahead stays passed
    triplets.data[key] = (f"{START + 5},{START + 5},1,{START + 5}", None)
    decisions, _, _ = scenario(config(), [(0, request())], triplets=triplets)
    assert decisions[0].reason == "passed"

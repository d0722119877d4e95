"""Triplet normalisation, client keys and store keys (pure functions)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

import pytest

from policyd import limits
from policyd.triplet import (
    KeyMaker,
    client_key,
    join_fields,
    normalise_recipient,
    normalise_sender,
    parse_client_address,
    recipient_domain,
    registrable_domain,
    sanitise_key,
    subnet_key,
)
from tests.greylist_helpers import config


@pytest.mark.parametrize(("sender", "expected"), [
    ("Alice@Example.ORG", "alice@example.org"),
    ("", "<>"),
    ("<>", "<>"),
    # +extension (mailing-list VERP) is cut
    ("list+bounces-alice=example.com@lists.example.org", "list@lists.example.org"),
    # whole-word numbers become '#', digits inside words stay (postgrey \b\d+\b)
    ("bounce-123-456@example.org", "bounce-#-#@example.org"),
    ("user123@example.org", "user123@example.org"),
    ("2024.05.01@example.org", "#.#.#@example.org"),
    # BATV, standard order prvs=TAG=user and the swapped one
    ("prvs=0123abcdef=alice@example.org", "alice@example.org"),
    ("PRVS=0123ABCDEF=Alice@Example.org", "alice@example.org"),
    ("prvs=alice=0123abcdef@example.org", "alice@example.org"),
    ("prvs=only-two@example.org", "prvs=only-two@example.org"),
    # SRS: hash and time stamp dropped, original sender kept
    ("SRS0=HhH1=TT=example.org=alice@fwd.example", "srs0=example.org=alice@fwd.example"),
    ("SRS0=zzzz=AB=example.org=alice@fwd.example", "srs0=example.org=alice@fwd.example"),
    ("SRS1=Xx1=hop.example==HhH=TT=example.org=alice@fwd.example",
     "srs1=hop.example=example.org=alice@fwd.example"),
    # no domain: left alone but lower-cased
    ("MAILER-DAEMON", "mailer-daemon"),
])
def test_sender_normalisation(sender: str, expected: str) -> None:
    assert normalise_sender(sender) == expected


def test_srs_senders_of_different_days_share_one_triplet() -> None:
    day1 = normalise_sender("SRS0=a1b2=XY=example.org=alice@fwd.example")
    day2 = normalise_sender("SRS0=c3d4=XZ=example.org=alice@fwd.example")
    assert day1 == day2


@pytest.mark.parametrize(("recipient", "expected"), [
    ("Bob@Example.COM", "bob@example.com"),
    ("bob+folder@example.com", "bob@example.com"),
    ("bob+a+b@example.com", "bob@example.com"),
    ("bob123@example.com", "bob123@example.com"),  # no digit folding for recipients
    ("postmaster", "postmaster"),
])
def test_recipient_normalisation(recipient: str, expected: str) -> None:
    assert normalise_recipient(recipient) == expected


def test_recipient_domain() -> None:
    assert recipient_domain("bob@example.com") == "example.com"
    assert recipient_domain("postmaster") == "postmaster"


def test_parse_client_address_maps_ipv4_in_ipv6() -> None:
    assert parse_client_address("::ffff:192.0.2.1") == ipaddress.IPv4Address("192.0.2.1")
    assert parse_client_address("2001:DB8::1").version == 6
    with pytest.raises(ValueError):
        parse_client_address("not-an-ip")


@pytest.mark.parametrize("address", [
    "192.0.2.1", "0.0.0.0", "255.255.255.255", " 192.0.2.1\t",
    "01.2.3.4", "1.2.3.04", "001.2.3.4", "1.2.3", "1.2.3.4.5", "256.1.1.1",
    "0x1.2.3.4", "1..2.3", "+1.2.3.4", "1.2.3.-4", "1.2.3.4/24", "\uff11.2.3.4",
    "1.2.3.4\x00", "", "::1", "::ffff:10.0.0.1",
])
def test_parse_client_address_agrees_with_ipaddress(address: str) -> None:
    # The IPv4 fast path (inet_pton) must accept and refuse exactly what
    # ipaddress does.
    try:
        expected = ipaddress.ip_address(address.strip())
    except ValueError:
        with pytest.raises(ValueError):
            parse_client_address(address)
        return
    if isinstance(expected, ipaddress.IPv6Address) and expected.ipv4_mapped is not None:
        expected = expected.ipv4_mapped
    assert parse_client_address(address) == expected


@pytest.mark.parametrize(("address", "v4", "v6", "expected"), [
    ("192.0.2.77", 24, 64, "192.0.2.0"),
    ("192.0.2.77", 16, 64, "192.0.0.0"),
    ("192.0.2.77", 32, 64, "192.0.2.77"),
    ("192.0.2.77", 0, 64, "0.0.0.0"),
    ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::"),
    ("2001:db8:1:2:3:4:5:6", 24, 48, "2001:db8:1::"),
    ("2001:db8:1:2:3:4:5:6", 24, 128, "2001:db8:1:2:3:4:5:6"),
])
def test_subnet_masking(address: str, v4: int, v6: int, expected: str) -> None:
    ip = parse_client_address(address)
    assert subnet_key(ip, v4, v6) == expected
    cfg = config(client_key="subnet", ipv4_prefix=v4, ipv6_prefix=v6)
    assert client_key(cfg, ip, "mail.example.org") == expected


def test_host_key_is_the_whole_address() -> None:
    cfg = config(client_key="host")
    assert client_key(cfg, parse_client_address("192.0.2.77"), "x.example.org") == "192.0.2.77"
    assert client_key(cfg, parse_client_address("2001:db8::7"), "x") == "2001:db8::7"


def test_smart_key_groups_one_providers_servers_across_subnets() -> None:
    cfg = config(client_key="smart")
    a = client_key(cfg, parse_client_address("198.51.100.5"),
                   "mail-a.outbound.protection.outlook.com")
    b = client_key(cfg, parse_client_address("203.0.113.9"),
                   "mail-b.eur.protection.outlook.com")
    assert a == b == "outlook.com"
    # public suffixes with two labels
    assert client_key(cfg, parse_client_address("198.51.100.5"),
                      "smtp1.example.co.uk") == "example.co.uk"


def test_smart_key_falls_back_to_subnet() -> None:
    cfg = config(client_key="smart", ipv4_prefix=24)
    ip = parse_client_address("198.51.100.5")
    assert client_key(cfg, ip, "unknown") == "198.51.100.0"
    assert client_key(cfg, ip, "") == "198.51.100.0"
    assert client_key(cfg, ip, "co.uk") == "198.51.100.0"  # a public suffix itself
    assert registrable_domain("localhost") is None


def test_sanitised_keys_have_no_white_space_and_stay_short() -> None:
    key = sanitise_key(join_fields("192.0.2.0", "a b\x01%c\u00e9@x", "bob@example.com"))
    assert key == "192.0.2.0/a%20b%01%25c%c3%a9@x/bob@example.com"
    assert key == key.lower()
    long = sanitise_key("192.0.2.0/" + "a" * 300 + "@example.org/bob@example.com")
    assert len(long) == 64 and all(c in "0123456789abcdef" for c in long)
    exact = "x" * limits.STORE_KEY_MAX_BYTES
    assert sanitise_key(exact) == exact


def test_keymaker_plain_and_private() -> None:
    plain = KeyMaker()
    assert plain.triplet_key("192.0.2.0", "a@x", "b@y") == "192.0.2.0/a@x/b@y"
    assert plain.client_record_key("192.0.2.0") == "192.0.2.0"
    private = KeyMaker(privacy=True, salt="s3cret")
    key = private.triplet_key("192.0.2.0", "a@x", "b@y")
    assert len(key) == 64 and "@" not in key and "192" not in key
    assert key == KeyMaker(privacy=True, salt="s3cret").triplet_key("192.0.2.0", "a@x", "b@y")
    assert key != KeyMaker(privacy=True, salt="other").triplet_key("192.0.2.0", "a@x", "b@y")
    assert private.client_record_key("192.0.2.0") != "192.0.2.0"


@pytest.mark.parametrize("keys", [KeyMaker(), KeyMaker(privacy=True, salt="s3cret")])
def test_a_slash_inside_a_field_cannot_make_two_triplets_one_key(keys: KeyMaker) -> None:
    """``/`` separates the fields and may appear in an address (issue 15)."""
    one = keys.triplet_key("192.0.2.0", "x@a.org", "y/z@example.com")
    other = keys.triplet_key("192.0.2.0", "x@a.org/y", "z@example.com")
    assert one != other
    # "%2f" written literally is not "/" either.
    assert keys.triplet_key("192.0.2.0", "x@a.org", "y%2fz@example.com") not in (one, other)
    if not keys.privacy:
        assert one == "192.0.2.0/x@a.org/y%2fz@example.com"
        assert other == "192.0.2.0/x@a.org%2fy/z@example.com"


def test_keys_without_a_slash_are_those_of_earlier_versions() -> None:
    """An upgrade changes only keys with ``/`` in an address (and, with
    privacy, ``%``): the other records are found again."""
    plain = KeyMaker()
    assert plain.triplet_key("192.0.2.0", "a%b@x", "b@y") == "192.0.2.0/a%25b@x/b@y"
    private = KeyMaker(privacy=True, salt="s3cret")
    assert private.triplet_key("192.0.2.0", "a@x", "b@y") == hmac.new(
        b"s3cret", b"192.0.2.0/a@x/b@y", hashlib.sha256).hexdigest()


@pytest.mark.parametrize("prefix", range(33))
@pytest.mark.parametrize("address", ["0.0.0.0", "255.255.255.255", "192.0.2.129", "10.1.2.3"])
def test_ipv4_subnet_key_matches_ipaddress(address: str, prefix: int) -> None:
    # subnet_key computes IPv4 networks by integer arithmetic; ipaddress is
    # the reference for every prefix length.
    expected = str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)
    assert subnet_key(ipaddress.ip_address(address), prefix, 64) == expected

"""postgrey-format whitelists: every entry kind, postgrey's own files,
bounds, start-up errors and reload."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from memtable.errors import ConfigError
from policyd import limits
from policyd.triplet import parse_client_address
from policyd.whitelist import Whitelists
from tests.greylist_helpers import write

POSTGREY_CLIENTS = "/etc/postgrey/whitelist_clients"
POSTGREY_RECIPIENTS = "/etc/postgrey/whitelist_recipients"


def clients(tmp_path: Path, text: str) -> Whitelists:
    return Whitelists.load([write(tmp_path / "clients", text)], [])


def client_hit(wl: Whitelists) -> Callable[[str, str], bool]:
    """The policy's question, with the address parsed as the policy does."""
    return lambda address, name: wl.clients.matches(parse_client_address(address), name)


def recipients(tmp_path: Path, text: str) -> Whitelists:
    return Whitelists.load([], [write(tmp_path / "recipients", text)])


def test_client_addresses_and_networks(tmp_path: Path) -> None:
    wl = clients(tmp_path, """
        # comment line
        192.0.2.7            # one host, trailing comment
        198.51.100.0/25
        203.0.113            # postgrey: partial address = /24
        10.20                # postgrey: /16
        2001:db8:1::/48
        ::ffff:192.0.2.200
    """)
    hit = client_hit(wl)
    assert hit("192.0.2.7", "unknown")
    assert not hit("192.0.2.8", "unknown")
    assert hit("198.51.100.127", "unknown")
    assert not hit("198.51.100.128", "unknown")
    assert hit("203.0.113.250", "unknown")
    assert hit("10.20.255.1", "unknown") and not hit("10.21.0.1", "unknown")
    assert hit("2001:db8:1:ffff::1", "unknown")
    assert not hit("2001:db8:2::1", "unknown")
    assert hit("::ffff:192.0.2.7", "unknown")  # mapped client address
    assert hit("192.0.2.200", "unknown")  # mapped entry


def test_client_names_exact_and_domain_suffix(tmp_path: Path) -> None:
    wl = clients(tmp_path, "example.org\nmx.Example.NET\n")
    hit = client_hit(wl)
    assert hit("192.0.2.1", "example.org")
    assert hit("192.0.2.1", "mail.Example.org")
    assert hit("192.0.2.1", "a.b.example.org.")
    assert not hit("192.0.2.1", "badexample.org")  # suffix only at a dot
    assert not hit("192.0.2.1", "example.org.evil.test")
    assert hit("192.0.2.1", "mx.example.net")
    assert hit("192.0.2.1", "in.mx.example.net")
    assert not hit("192.0.2.1", "example.net")
    assert not hit("192.0.2.1", "unknown")


def test_client_regex(tmp_path: Path) -> None:
    wl = clients(tmp_path, r"/^mail\d+\.telekom\.de$/" "\n" r"/^s[cv]\d+pub\.verizon\.net$/" "\n")
    hit = client_hit(wl)
    assert hit("192.0.2.1", "MAIL12.telekom.de")
    assert not hit("192.0.2.1", "mailx.telekom.de")
    assert hit("192.0.2.1", "sv3pub.verizon.net")


def test_recipient_kinds(tmp_path: Path) -> None:
    wl = recipients(tmp_path, """
        postmaster@
        abuse@example.com
        example.net
        /^list-.*@example\\.org$/
    """)
    hit = wl.recipient_whitelisted
    assert hit("postmaster@anything.test") and hit("Postmaster+x@Other.test")
    assert not hit("postmasters@example.com")
    assert hit("abuse@example.com") and hit("abuse+spam@EXAMPLE.com")
    assert not hit("abuse@example.org") and not hit("abuse+@example.com")
    assert hit("anyone@example.net") and hit("anyone@sub.example.net")
    assert not hit("anyone@notexample.net")
    assert hit("list-users@example.org") and not hit("users@example.org")


def test_recipient_entry_with_extension(tmp_path: Path) -> None:
    wl = recipients(tmp_path, "bob+lists@example.com\n")
    assert wl.recipient_whitelisted("bob+lists@example.com")
    assert wl.recipient_whitelisted("bob+lists+x@example.com")
    assert not wl.recipient_whitelisted("bob@example.com")


def test_postgreys_own_files_parse() -> None:
    wl = Whitelists.load([POSTGREY_CLIENTS], [POSTGREY_RECIPIENTS])
    assert len(wl.clients) > 100
    assert client_hit(wl)("192.0.2.1", "smtp3.tiscali.dk")  # regex entry
    assert client_hit(wl)("192.0.2.1", "lists.debian.org")  # domain suffix
    assert wl.recipient_whitelisted("postmaster@example.com")
    assert not client_hit(wl)("192.0.2.1", "mail.example.com")


@pytest.mark.parametrize("text", ["/(unclosed/\n", "300.1.2.3\n", "1.2.3.4/40\n",
                                  "2001:db8::zz\n"])
def test_bad_client_entries_name_file_and_line(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        clients(tmp_path, "# first\n" + text)
    assert err.value.path == str(tmp_path / "clients") and err.value.line == 2


def test_bad_recipient_entry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        recipients(tmp_path, "/[z-a]/\n")
    assert err.value.line == 1


def test_missing_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as err:
        Whitelists.load([missing], [])
    assert err.value.path == missing
    with pytest.raises(ConfigError):
        Whitelists.load([], [missing])


def test_bounds(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"# x\n" * (limits.WHITELIST_FILE_MAX_BYTES // 4 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        Whitelists.load([str(big)], [])
    with pytest.raises(ConfigError, match="more than 3") as err:
        Whitelists.load([write(tmp_path / "clients", "a.test\nb.test\nc.test\nd.test\n")], [],
                        max_entries=3)
    assert err.value.line == 4
    with pytest.raises(ConfigError, match="longer than"):
        clients(tmp_path, "/" + "a" * limits.WHITELIST_MAX_LINE_CHARS + "/\n")


def test_reload_replaces_lists_and_keeps_old_ones_on_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "clients"
    wl = clients(tmp_path, "old.example\n")
    path.write_text("new.example\n")
    assert wl.reload()
    assert client_hit(wl)("192.0.2.1", "new.example")
    assert not client_hit(wl)("192.0.2.1", "old.example")
    path.write_text("/(broken/\n")
    with caplog.at_level(logging.ERROR):
        assert not wl.reload()
    assert "keeping the old whitelists" in caplog.text
    assert client_hit(wl)("192.0.2.1", "new.example")
    path.unlink()
    assert not wl.reload()
    assert client_hit(wl)("192.0.2.1", "new.example")


def test_missing_local_file_is_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The docs' `whitelist_clients = .../whitelist_clients,
    .../whitelist_clients.local`: Debian ships no .local file, and postgrey
    skips a missing one (``unless $f =~ /\\.local$/``); policyd warns."""
    main = write(tmp_path / "whitelist_clients", "main.example\n")
    local = tmp_path / "whitelist_clients.local"
    with caplog.at_level(logging.WARNING):
        wl = Whitelists.load([main, str(local)], [str(tmp_path / "whitelist_recipients.local")])
    assert client_hit(wl)("192.0.2.1", "main.example")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{local}: whitelist not found, skipped (a missing .local file is "
                      "allowed, as in postgrey)",
                      f"{tmp_path / 'whitelist_recipients.local'}: whitelist not found, "
                      "skipped (a missing .local file is allowed, as in postgrey)"]
    # Once it exists it is read, at a reload as well.
    local.write_text("local.example\n")
    assert wl.reload()
    assert client_hit(wl)("192.0.2.1", "local.example")


def test_missing_main_list_beside_a_local_file_is_still_an_error(tmp_path: Path) -> None:
    local = write(tmp_path / "whitelist_clients.local", "local.example\n")
    missing = str(tmp_path / "whitelist_clients")
    with pytest.raises(ConfigError) as err:
        Whitelists.load([missing, local], [])
    assert err.value.path == missing
    # Only a missing .local file is optional: one that cannot be read is not.
    unreadable = tmp_path / "dir.local"
    unreadable.mkdir()
    with pytest.raises(ConfigError, match="Is a directory"):
        Whitelists.load([str(unreadable)], [])

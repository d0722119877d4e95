"""Postfix-style .cf parsing and memcache_table(5) configuration."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from memtable import cf
from memtable.config import MemcacheConfig
from memtable.endpoint import Endpoint
from memtable.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "t.cf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_comments_blank_lines_and_continuations() -> None:
    entries = cf.parse_cf_text(
        "# comment\n\nmemcache = inet:127.0.0.1:11211\n  # inner comment\n"
        "domain = a.example,\n  b.example\n\tc.example\nempty =\n", "x.cf")
    # Continuation lines are appended as they are, as Postfix's readllines()
    # does (memtable.syntax); list values split the same either way.
    assert entries["domain"].value == "a.example,  b.example\tc.example"
    assert entries["domain"].line == 5
    assert entries["empty"].value == ""
    assert entries["memcache"].value == "inet:127.0.0.1:11211"
    assert cf.split_list(entries["domain"].value) == ["a.example", "b.example", "c.example"]


def test_later_setting_wins_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    entries = cf.parse_cf_text("ttl = 1\nttl = 2\n", "x.cf")
    assert entries["ttl"].value == "2"
    assert "set again" in caplog.text


def test_missing_equals_names_file_and_line() -> None:
    with pytest.raises(ConfigError) as err:
        cf.parse_cf_text("ttl = 1\nbogus line\n", "x.cf")
    assert str(err.value).startswith("x.cf, line 2: ")


@pytest.mark.parametrize(("text", "message"), [
    ("= 1\n", 'missing attribute name: "= 1"'),
    ("\x00ttl = 1\n", 'missing attribute name: ""'),  # a NUL ends the text, as in C
    ("ttl 1\n", "missing '=' after attribute name: \"ttl 1\""),
])
def test_split_nameval_errors_as_postfix(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cf.parse_cf_text(text, "x.cf")
    assert str(err.value) == f"x.cf, line 1: {message}"


def test_split_list_keeps_braces_whole() -> None:
    assert cf.split_list("a, inline:{x=1, y=2} !b") == ["a", "inline:{x=1, y=2}", "!b"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("300", 300), ("300s", 300), ("5m", 300), ("2h", 7200), ("2d", 172800), ("1w", 604800),
])
def test_time_units(text: str, seconds: int) -> None:
    assert cf.parse_time(cf.CfEntry("t", text, "f", 1)) == seconds


def test_leading_zeros_do_not_count_as_digits(tmp_path: Path) -> None:
    config = MemcacheConfig.from_file(write(tmp_path, "ttl = " + "0" * 5000 + "42\n"))
    assert config.ttl == 42


@pytest.mark.parametrize("text", ["", "5x", "-1", "1.5h", "h", "9" * 5000 + "s", "9" * 5000])
def test_bad_time_values(text: str) -> None:
    with pytest.raises(ConfigError, match="f, line 3"):
        cf.parse_time(cf.CfEntry("t", text, "f", 3))


def test_defaults_match_postfix(tmp_path: Path) -> None:
    config = MemcacheConfig.from_file(write(tmp_path, ""))
    assert config.memcache == Endpoint("inet", host="localhost", port=11211)
    assert (config.flags, config.ttl, config.key_format, config.backup) == (0, 3600, "%s", None)
    assert (config.data_size_limit, config.line_size_limit) == (10240, 1024)
    assert (config.max_try, config.retry_pause, config.timeout) == (2, 1, 2)
    assert config.domain == () and config.key_digest == ""


@pytest.mark.parametrize(("line", "message"), [
    ("max_try = 0", "invalid value 0 < 1"),
    ("retry_pause = 0", "invalid value 0 < 1"),
    ("line_size_limit = 0", "invalid value 0 < 1"),
    ("data_size_limit = 0", "invalid value 0 < 1"),
    ("ttl = -1", "invalid value -1 < 0"),
    ("ttl = 1d", "bad numerical configuration"),
    # Over 4300 digits Python's int() raises ValueError (issue 15).
    ("ttl = " + "9" * 5000, "bad numerical configuration"),
    ("max_try = -" + "9" * 5000, "bad numerical configuration"),
    ("ttl = 123456789012345678901", "bad numerical configuration"),
    ("memcache = inet:localhost:" + "9" * 5000, "out of range"),
    ("memcache = inet:localhost:\u00b2", "unknown port name"),
    ("flags = 99999999999", "> 2147483647"),
    ("key_format = %x", "invalid expansion"),
    ("key_format = abc%", "lone"),
    ("key_digest = nosuchdigest", "nosuchdigest"),
    ("memcache = tcp:a:b:1", "unsupported endpoint type"),
    ("memcache = inet:host", "expected inet:host:port"),
])
def test_bad_values_are_errors_with_file_and_line(tmp_path: Path, line: str,
                                                  message: str) -> None:
    path = write(tmp_path, f"# first\n{line}\n")
    with pytest.raises(ConfigError) as err:
        MemcacheConfig.from_file(path)
    assert f"{path}, line 2:" in str(err.value)
    assert message in str(err.value)


def test_unknown_parameter_is_a_warning_with_file_and_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "ttl = 5\nttll = 6\n")
    with caplog.at_level(logging.WARNING):
        config = MemcacheConfig.from_file(path)
    assert config.ttl == 5
    assert f"{path}, line 2: unknown parameter ttll ignored" in caplog.text


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        MemcacheConfig.from_file(str(tmp_path / "missing.cf"))
    big = tmp_path / "big.cf"
    big.write_bytes(b"# x\n" * 300_000)
    with pytest.raises(ConfigError, match="larger than"):
        MemcacheConfig.from_file(str(big))
    bad = tmp_path / "bad.cf"
    bad.write_bytes(b"ttl = \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        MemcacheConfig.from_file(str(bad))


@pytest.mark.parametrize(("spec", "expected"), [
    ("inet:localhost:11211", Endpoint("inet", host="localhost", port=11211)),
    ("inet:[fc00:8d00:189::3]:11211", Endpoint("inet", host="fc00:8d00:189::3", port=11211)),
    ("unix:/path/to/socket", Endpoint("unix", path="/path/to/socket")),
    ("127.0.0.1:11211", Endpoint("inet", host="127.0.0.1", port=11211)),
])
def test_server_specs(tmp_path: Path, spec: str, expected: Endpoint) -> None:
    config = MemcacheConfig.from_file(write(tmp_path, f"memcache = {spec}\n"))
    assert config.memcache == expected


@pytest.mark.parametrize(("host", "why"), [
    ("mc..example.com", "empty label"),
    (".example.com", "empty label"),
    ("a" * 64 + ".example.com", "label longer than 63"),
    (".".join(["a" * 63] * 4) + ".com", "longer than 253"),
    ("mc example.com", "white space or control"),
])
def test_impossible_memcache_host_is_a_configuration_error(tmp_path: Path, host: str,
                                                           why: str) -> None:
    """A host name no resolver can look up is a typo: refused with the file
    and line when the table is opened, never a UnicodeError at the first
    lookup (which is not an OSError: the backup would not answer)."""
    path = write(tmp_path, f"# first\nmemcache = inet:{host}:11211\n")
    with pytest.raises(ConfigError) as err:
        MemcacheConfig.from_file(path)
    assert f"{path}, line 2: memcache = inet:{host}:11211:" in str(err.value)
    assert "impossible host name" in str(err.value) and why in str(err.value)


@pytest.mark.parametrize("host", ["mc.example.com.", "mc-1.example_net.example",
                                  "bücher.example", "a" * 63 + ".example.com", "127.0.0.1"])
def test_possible_memcache_hosts_are_accepted(tmp_path: Path, host: str) -> None:
    config = MemcacheConfig.from_file(write(tmp_path, f"memcache = inet:{host}:11211\n"))
    assert config.memcache == Endpoint("inet", host=host, port=11211)

"""memcached's 30-day rule: ttls over 30 days are sent as absolute times."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from freezegun import freeze_time

from memtable import open_table
from memtable.errors import ConfigError
from memtable.limits import MEMCACHED_RELATIVE_TTL_MAX
from memtable.ttl import describe, wire_exptime
from tests.conftest import Memcached

NOW = dt.datetime(2026, 11, 21, 12, 0, 0, tzinfo=dt.UTC)
NOW_TS = int(NOW.timestamp())


@freeze_time(NOW)
def test_relative_ttls_are_sent_as_is() -> None:
    assert wire_exptime(0) == 0
    assert wire_exptime(1) == 1
    assert wire_exptime(MEMCACHED_RELATIVE_TTL_MAX) == MEMCACHED_RELATIVE_TTL_MAX


@freeze_time(NOW)
def test_ttls_over_30_days_become_absolute() -> None:
    assert wire_exptime(MEMCACHED_RELATIVE_TTL_MAX + 1) == NOW_TS + MEMCACHED_RELATIVE_TTL_MAX + 1
    assert wire_exptime(90 * 86400) == NOW_TS + 90 * 86400


def test_absolute_time_follows_the_clock() -> None:
    with freeze_time(NOW) as frozen:
        first = wire_exptime(90 * 86400)
        frozen.tick(dt.timedelta(days=3))
        assert wire_exptime(90 * 86400) == first + 3 * 86400


def test_negative_and_unrepresentable_ttls() -> None:
    with pytest.raises(ConfigError):
        wire_exptime(-1)
    with freeze_time("2100-01-01"), pytest.raises(ConfigError, match="2106"):
        wire_exptime(20 * 365 * 86400)


def test_describe_explains_postfix_behaviour() -> None:
    assert "never expire" in describe(0)
    assert "relative" in describe(3600)
    assert "1970" in describe(90 * 86400)


def _table(tmp_path: Path, memcached: Memcached, ttl: int) -> str:
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {memcached.spec}\nttl = {ttl}\nkey_format = ttl:%s\n")
    return f"memcache:{cf}"


def test_90_day_item_survives_in_real_memcached(tmp_path: Path, memcached: Memcached) -> None:
    """Postfix would send 7776000 (a 1970 date: gone at once); memtable's
    item stays and memcached reports about 90 days left."""
    with open_table(_table(tmp_path, memcached, 90 * 86400), read_write=True) as table:
        table.update("user@example.com", "kept")
        assert table.lookup("user@example.com") == "kept"
    meta = memcached.meta("ttl:user@example.com")
    assert meta is not None
    assert abs(int(str(meta["ttl"])) - 90 * 86400) <= 5


def test_postfix_style_absolute_number_expires_at_once(memcached: Memcached) -> None:
    """What Postfix does: the raw number over 30 days is a date in 1970."""
    assert memcached.raw(b"set raw 0 7776000 1\r\nx\r\n") == b"STORED\r\n"
    assert memcached.meta("raw") is None


def test_per_update_ttl_uses_the_same_rule(tmp_path: Path, memcached: Memcached) -> None:
    with open_table(_table(tmp_path, memcached, 60), read_write=True) as table:
        table.update("a@example.com", "short")
        table.update("b@example.com", "long", ttl=35 * 86400)
        table.update("c@example.com", "forever", ttl=0)
    ttls = {k: memcached.meta(f"ttl:{k}@example.com") for k in "abc"}
    assert all(ttls.values())
    assert 55 <= int(str(ttls["a"]["ttl"])) <= 60  # type: ignore[index]
    assert abs(int(str(ttls["b"]["ttl"])) - 35 * 86400) <= 5  # type: ignore[index]
    assert ttls["c"]["ttl"] == -1  # type: ignore[index]

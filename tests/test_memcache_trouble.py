"""A memcache table with a backup while its real memcached misbehaves:
hung (SIGSTOP), dead, or full (``-M``).  What is answered, what memcached
holds afterwards, and what is logged."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import memtable.memcache_table
from memtable import clock, open_table
from memtable.limits import MEMCACHE_DOWN_HOLD_SECONDS, MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS
from memtable.memcache_table import MemcacheTable
from tests.conftest import Memcached, start_memcached


@pytest.fixture
def shift_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Move memtable's monotonic clock forward (hold-downs, log intervals)
    without sleeping; real time still passes underneath."""
    offset = [0.0]
    real = time.monotonic
    monkeypatch.setattr(clock, "monotonic", lambda: real() + offset[0])

    def shift(seconds: float) -> None:
        offset[0] += seconds
    return shift


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Memcached]:
    """A memcached of this test's own (it is paused or stopped)."""
    mc = start_memcached(tmp_path)
    yield mc
    mc.proc.send_signal(signal.SIGCONT)
    mc.stop()


def table_with_backup(tmp_path: Path, memcache: str, *lines: str) -> MemcacheTable:
    cf = tmp_path / "t.cf"
    cf.write_text("\n".join([f"memcache = {memcache}", f"backup = lmdb:{tmp_path / 'bk'}",
                             "timeout = 1", "max_try = 2", *lines]) + "\n")
    table = open_table(f"memcache:{cf}", read_write=True)
    assert isinstance(table, MemcacheTable)
    return table


def value(server: Memcached, key: str) -> object:
    meta = server.meta(key)
    return None if meta is None else meta["value"]


# -- a write memcached missed is never read back stale (issue 15, item 2) -------


def test_writes_during_a_hang_are_not_read_back_stale_and_are_repaired(
        tmp_path: Path, server: Memcached, shift_clock: Callable[[float], None]) -> None:
    """memcached hangs: the first command times out and holds it down, the
    writes after it go to the backup only, and memcached keeps its older
    copies.  Once it answers again those copies are never served: the
    backup's values are, and memcached is rewritten from the backup (with
    the ttls the writes asked for; deleted keys deleted)."""
    table = table_with_backup(tmp_path, server.spec)
    with table:
        table.update("k", "old", ttl=600)
        table.update("m", "old m")
        table.update("gone", "x")
        table.update("quiet", "old quiet")
        server.pause()
        assert table.lookup("k") == "old"     # from the backup, after one timeout
        table.update("k", "new", ttl=600)     # held down: the backup only
        assert table.update_many([("m", "new m", 300), ("quiet", "new quiet", None)]) \
            == [None, None]
        assert table.delete("gone") is True
        server.proc.send_signal(signal.SIGCONT)
        shift_clock(MEMCACHE_DOWN_HOLD_SECONDS)
        # memcached still holds the older copies ...
        assert [value(server, k) for k in ("k", "m", "gone")] == ["old", "old m", "x"]
        # ... which are never served.
        assert table.lookup("k") == "new"
        assert table.lookup_many(["m", "gone"]) == {"m": "new m", "gone": None}
        # memcached answered again: the stale keys were rewritten from the backup
        # (quiet was never read since), the deleted one deleted.
        assert value(server, "quiet") == "new quiet"
        assert value(server, "gone") is None
        for key, ttl in (("k", 600), ("m", 300)):
            meta = server.meta(key)
            assert meta is not None and meta["value"] == f"new {key}".replace("new k", "new")
            assert ttl - 10 <= int(str(meta["ttl"])) <= ttl


def test_stale_keys_over_the_bound_are_forgotten_with_a_warning(
        tmp_path: Path, server: Memcached, shift_clock: Callable[[float], None],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Over MEMCACHE_STALE_KEYS_MAX the oldest stale keys are forgotten,
    with a warning: those (and only those) memcached may serve stale."""
    monkeypatch.setattr(memtable.memcache_table, "MEMCACHE_STALE_KEYS_MAX", 2)
    table = table_with_backup(tmp_path, server.spec)
    with table:
        for key in ("a", "b", "c"):
            table.update(key, "old")
        server.pause()
        assert table.lookup("a") == "old"  # times out: held down
        with caplog.at_level(logging.WARNING, logger="memtable"):
            for key in ("a", "b", "c"):
                table.update(key, "new")
        server.proc.send_signal(signal.SIGCONT)
        shift_clock(MEMCACHE_DOWN_HOLD_SECONDS)
        assert "more than 2 keys changed in the backup only: 1 of the oldest forgotten" \
            in caplog.text
        assert table.lookup_many(["a", "b", "c"]) == {"a": "old", "b": "new", "c": "new"}


def test_keys_still_stale_at_close_are_named(tmp_path: Path, server: Memcached,
                                             caplog: pytest.LogCaptureFixture) -> None:
    table = table_with_backup(tmp_path, server.spec)
    table.update("k", "old")
    server.stop()
    table.update("k", "new")
    with caplog.at_level(logging.WARNING, logger="memtable"):
        table.close()
    assert "1 key was changed in the backup only and memcached may serve older values " \
        "for them until they expire or are written again (k)" in caplog.text


# -- an outage is logged once, not per operation (issue 15, item 7) --------------


def test_an_outage_is_logged_when_it_starts_now_and_then_and_when_it_ends(
        tmp_path: Path, server: Memcached, shift_clock: Callable[[float], None],
        caplog: pytest.LogCaptureFixture) -> None:
    port = server.port
    table = table_with_backup(tmp_path, server.spec)
    with table, caplog.at_level(logging.DEBUG, logger="memtable"):
        table.update("k", "v")
        server.stop()
        for i in range(100):
            table.update(f"k{i}", "v")
            assert table.lookup(f"k{i}") == "v"
        assert table.lookup_many(["k1", "k2", "nothing"]) == {"k1": "v", "k2": "v",
                                                              "nothing": None}
        shift_clock(MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS)
        table.update("k", "w")
        restarted = start_memcached(tmp_path, port=port)
        try:
            shift_clock(20)
            assert table.lookup("k") == "w"
            table.close()  # rewrites the keys memcached missed: no warning
        finally:
            restarted.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    subject = f"memcache server {server.spec} ({table.spec})"
    assert len(warnings) == 3, warnings
    assert warnings[0] == (f"{subject}: unavailable: connect: Connection refused (after 1 "
                           f"attempt); answering from the backup lmdb:{tmp_path / 'bk'}")
    # After the first: 100 updates (each answered by the backup) and the
    # write-backs of the 100 lookups that read them (from the backup: the
    # keys are stale), a lookup_many (one get, one write-back), the update.
    assert warnings[1] == (f"{subject}: still unavailable after 60 s: connect: Connection "
                           "refused (after 1 attempt); 202 failed commands, 101 operations "
                           "answered from the backup since the last report")
    assert warnings[2] == f"{subject}: available again after 80 s, 102 operations answered " \
        "from the backup"


# -- a full memcached (-M) costs no retry pauses (issue 15, item 8) ---------------


def test_a_full_memcached_that_refuses_writes_costs_no_retry_pause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """memcached -M with its memory full answers every write `SERVER_ERROR
    out of memory`.  With a backup to answer, such a write is not retried
    (Postfix pays retry_pause for every one): the batch goes to the backup
    at once, the values read back are the backup's, and the trouble is
    logged once."""
    full = start_memcached(tmp_path, extra=("-M", "-m", "2"))
    try:
        value = "v" * 20
        with full.connect() as sock:  # fill it with items of our values' size
            for n in range(100_000):
                sock.sendall(b"set filler%d 0 0 20\r\n%s\r\n" % (n, value.encode()))
                reply = sock.recv(100)
                if reply != b"STORED\r\n":
                    assert reply.startswith(b"SERVER_ERROR out of memory"), reply
                    break
            else:
                pytest.fail("memcached -M -m 2 never filled up")
        pauses: list[float] = []
        monkeypatch.setattr(clock, "sleep", pauses.append)
        table = table_with_backup(tmp_path, full.spec, "retry_pause = 1")
        with table, caplog.at_level(logging.WARNING, logger="memtable"):
            for batch in range(5):
                items = [(f"b{batch}k{i}", value, None) for i in range(10)]
                assert table.update_many(items) == [None] * 10
            table.update("single", value)
            assert table.lookup_many([f"b{b}k{i}" for b in range(5) for i in range(10)]) \
                == {f"b{b}k{i}": value for b in range(5) for i in range(10)}
            assert table.lookup("single") == value
        assert pauses == []
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 2, warnings
        assert warnings[0].startswith(f"memcache server {full.spec} ({table.spec}): refusing "
                                      "writes: SERVER_ERROR out of memory")
        assert warnings[0].endswith(f"writing to the backup lmdb:{tmp_path / 'bk'} only")
        # memcached never took them: named when the table closes.
        assert warnings[1].startswith(f"{table.spec}: 51 keys were changed in the backup only")
    finally:
        full.stop()


def test_a_value_too_long_for_memcached_does_not_leave_the_older_one_there(
        tmp_path: Path, memcached: Memcached) -> None:
    """Postfix stores a value over data_size_limit in the backup only and
    leaves memcached's older value to be served; memtable deletes it."""
    table = table_with_backup(tmp_path, memcached.spec, "data_size_limit = 10")
    with table:
        table.update("k", "short")
        table.update("k", "x" * 11)  # the backup only, with a warning
        assert table.lookup("k") == "x" * 11
    assert memcached.meta("k") is None


def test_a_flapping_server_is_announced_at_most_once_per_interval(
        shift_clock: Callable[[float], None], caplog: pytest.LogCaptureFixture) -> None:
    """Troubles that start again within the interval after the last line
    are not announced (nor their ends): their failures are counted into the
    next line."""
    from memtable.outage import OutageLog

    trouble = OutageLog("inet:mc:11211 (t.cf)", trouble="unavailable",
                        fallback="answering from the backup lmdb:bk",
                        recovered="available again")
    with caplog.at_level(logging.WARNING, logger="memtable.wire"):
        for _ in range(50):
            trouble.failed("SERVER_ERROR busy")
            trouble.answered_by_backup(1)
            trouble.succeeded()
            shift_clock(1)
        shift_clock(MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS)
        trouble.failed("SERVER_ERROR busy")
    assert [r.getMessage() for r in caplog.records] == [
        "memcache server inet:mc:11211 (t.cf): unavailable: SERVER_ERROR busy; answering from "
        "the backup lmdb:bk",
        "memcache server inet:mc:11211 (t.cf): available again after 0 s, 1 operations "
        "answered from the backup",
        "memcache server inet:mc:11211 (t.cf): unavailable: SERVER_ERROR busy; answering from "
        "the backup lmdb:bk (49 more failed commands since the last report)",
    ]

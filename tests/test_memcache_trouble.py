"""A memcache table with a backup while its real memcached misbehaves:
hung (SIGSTOP), dead, or full (``-M``).  What is answered, what memcached
holds afterwards, and what is logged: on both memcache drivers (the
``open_table`` fixture builds the table's wire as the blocking MemcacheWire
or the asyncio one, tests/wire_drivers.py); the stale-key tests also on
AsyncMemcacheTable."""

from __future__ import annotations

import bisect
import logging
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memtable import clock
from memtable.limits import (
    MEMCACHE_DOWN_HOLD_SECONDS,
    MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS,
    MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL,
)
from memtable.outage import OutageLog
from memtable.table import Table
from tests.conftest import Memcached, start_memcached
from tests.memcache_runners import OPENERS, AsyncAdapter, MemcacheTables, Opener


@pytest.fixture(name="open_table", params=["blocking", "asyncio-wire"])
def open_table_fixture(request: pytest.FixtureRequest) -> Opener:
    """open_table whose memcache tables talk to memcached through the
    driver under test (tests.memcache_runners.OPENERS)."""
    return OPENERS[request.param]


# The stale-key tests run on AsyncMemcacheTable too.
EVERY_RUNNER = pytest.mark.parametrize("open_table", list(OPENERS), indirect=True)


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
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """memtable's monotonic clock stopped, moved only by the test: for
    durations a log line states exactly (nothing here waits on a timeout)."""
    offset = [time.monotonic()]
    monkeypatch.setattr(clock, "monotonic", lambda: offset[0])

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


def table_with_backup(open_table: Opener, tmp_path: Path, memcache: str, *lines: str) -> Table:
    cf = tmp_path / "t.cf"
    cf.write_text("\n".join([f"memcache = {memcache}", f"backup = lmdb:{tmp_path / 'bk'}",
                             "timeout = 1", "max_try = 2", *lines]) + "\n")
    table = open_table(f"memcache:{cf}", read_write=True)
    assert isinstance(table, MemcacheTables)
    return table


def value(server: Memcached, key: str) -> object:
    meta = server.meta(key)
    return None if meta is None else meta["value"]


# -- a write memcached missed is never read back stale (issue 15, item 2) -------


@EVERY_RUNNER
def test_writes_during_a_hang_are_not_read_back_stale_and_are_repaired(
        open_table: Opener, tmp_path: Path, server: Memcached,
        shift_clock: Callable[[float], None]) -> None:
    """memcached hangs: the first command times out and holds it down, the
    writes after it go to the backup only, and memcached keeps its older
    copies.  Once it answers again those copies are never served: the
    backup's values are, and memcached is rewritten from the backup (with
    the ttls the writes asked for; deleted keys deleted)."""
    table = table_with_backup(open_table, tmp_path, server.spec)
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


@EVERY_RUNNER
def test_stale_keys_over_the_bound_are_forgotten_with_a_warning(
        open_table: Opener, tmp_path: Path, server: Memcached, shift_clock: Callable[[float], None],
        caplog: pytest.LogCaptureFixture) -> None:
    """Over the bound (MemcacheRules.stale_keys_max) the oldest stale keys are forgotten,
    with a warning: those (and only those) memcached may serve stale."""
    table = table_with_backup(open_table, tmp_path, server.spec)
    rules = table.inner.rules if isinstance(table, AsyncAdapter) else table.rules
    rules.stale_keys_max = 2
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


@EVERY_RUNNER
def test_keys_still_stale_at_close_are_named(open_table: Opener, tmp_path: Path,
                                             server: Memcached,
                                             caplog: pytest.LogCaptureFixture) -> None:
    table = table_with_backup(open_table, tmp_path, server.spec)
    table.update("k", "old")
    server.stop()
    table.update("k", "new")
    with caplog.at_level(logging.WARNING, logger="memtable"):
        table.close()
    assert "1 key was changed in the backup only and memcached may serve older values " \
        "for them until they expire or are written again (k)" in caplog.text


# -- an outage is logged once, not per operation (issue 15, item 7) --------------


def test_an_outage_is_logged_when_it_starts_now_and_then_and_when_it_ends(
        open_table: Opener, tmp_path: Path, server: Memcached,
        frozen_clock: Callable[[float], None], caplog: pytest.LogCaptureFixture) -> None:
    shift_clock = frozen_clock
    port = server.port
    table = table_with_backup(open_table, tmp_path, server.spec)
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


def test_each_hang_soon_after_an_outage_is_logged_when_it_starts_and_ends(
        open_table: Opener, tmp_path: Path, server: Memcached, shift_clock: Callable[[float], None],
        caplog: pytest.LogCaptureFixture) -> None:
    """The operator's trial: memcached killed and restarted (both logged),
    then hung (SIGSTOP) twice within the next minute.  Each hang stalls a
    request for `timeout`: each is logged when it starts and when it ends,
    though the lines before it are less than a minute old."""
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {server.spec}\nbackup = lmdb:{tmp_path / 'bk'}\n"
                  "timeout = 1\nmax_try = 1\n")
    table = open_table(f"memcache:{cf}", read_write=True)
    port = server.port
    server.stop()
    restarted: list[Memcached] = []
    try:
        with table, caplog.at_level(logging.WARNING, logger="memtable"):
            assert table.lookup("k") is None            # refused: the backup answers
            restarted.append(start_memcached(tmp_path, port=port))
            shift_clock(10)
            assert table.lookup("k") is None            # memcached again
            for _ in range(2):
                shift_clock(5)
                restarted[0].pause()
                assert table.lookup("k") is None        # times out: held down
                shift_clock(MEMCACHE_DOWN_HOLD_SECONDS - 1)
                assert table.lookup("k") is None        # held down
                restarted[0].proc.send_signal(signal.SIGCONT)
                shift_clock(1)
                assert table.lookup("k") is None        # memcached again
    finally:
        for mc in restarted:
            mc.proc.send_signal(signal.SIGCONT)
            mc.stop()
    subject = f"memcache server {server.spec} ({table.spec})"
    backup = f"lmdb:{tmp_path / 'bk'}"
    hang = (f"{subject}: unavailable: timeout after 1 s (after 1 attempt); held down for 5 s; "
            f"answering from the backup {backup}")
    hang_end = f"{subject}: available again after N s, 2 operations answered from the backup"
    # The durations are the clock's shifts plus real time (a memcached start):
    # at most a second more on a busy machine.
    lines, durations = [], []
    for record in caplog.records:
        found = re.search(r" after (\d+) s,", record.getMessage())
        if found:
            durations.append(int(found.group(1)))
        lines.append(re.sub(r" after \d+ s,", " after N s,", record.getMessage()))
    assert lines == [
        f"{subject}: unavailable: connect: Connection refused (after 1 attempt); answering "
        f"from the backup {backup}",
        f"{subject}: available again after N s, 1 operations answered from the backup",
        hang, hang_end, hang, hang_end]
    assert len(durations) == 3, lines
    assert all(0 <= d - shifted <= 1
               for d, shifted in zip(durations, (10, 5, 5), strict=True)), durations


# -- a full memcached (-M) costs no retry pauses (issue 15, item 8) ---------------


def test_a_full_memcached_that_refuses_writes_costs_no_retry_pause(
        open_table: Opener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
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

        async def async_pause(seconds: float) -> None:
            pauses.append(seconds)

        monkeypatch.setattr(clock, "sleep", pauses.append)
        monkeypatch.setattr(clock, "async_sleep", async_pause)
        table = table_with_backup(open_table, tmp_path, full.spec, "retry_pause = 1")
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
        open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    """Postfix stores a value over data_size_limit in the backup only and
    leaves memcached's older value to be served; memtable deletes it."""
    table = table_with_backup(open_table, tmp_path, memcached.spec, "data_size_limit = 10")
    with table:
        table.update("k", "short")
        table.update("k", "x" * 11)  # the backup only, with a warning
        assert table.lookup("k") == "x" * 11
    assert memcached.meta("k") is None


def flapping_log() -> OutageLog:
    return OutageLog("inet:mc:11211 (t.cf)", trouble="unavailable",
                     fallback="answering from the backup lmdb:bk", recovered="available again")


def flap(trouble: OutageLog, shift_clock: Callable[[float], None], times: int) -> None:
    for _ in range(times):
        trouble.failed("SERVER_ERROR busy")
        trouble.answered_by_backup(1)
        trouble.succeeded()
        shift_clock(1)


FLAP = "memcache server inet:mc:11211 (t.cf)"
FLAP_START = f"{FLAP}: unavailable: SERVER_ERROR busy; answering from the backup lmdb:bk"
FLAP_END = f"{FLAP}: available again after 0 s, 1 operations answered from the backup"


def test_a_flapping_server_is_announced_a_few_times_then_summed_up(
        shift_clock: Callable[[float], None], caplog: pytest.LogCaptureFixture) -> None:
    """The first troubles of an interval are announced (start and end); a
    server that flaps more has the rest summed up in one line at the first
    command once the interval allows, the ones after that are announced
    again."""
    trouble = flapping_log()
    starts = MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL
    with caplog.at_level(logging.WARNING, logger="memtable.wire"):
        flap(trouble, shift_clock, 50)
        assert len(caplog.records) == 2 * starts
        shift_clock(MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS - 50)
        trouble.succeeded()  # the next command after the interval: the summary
        flap(trouble, shift_clock, 1)  # within the interval of the second start
        flap(trouble, shift_clock, 1)
    assert [r.getMessage() for r in caplog.records] == [FLAP_START, FLAP_END] * starts + [
        f"{FLAP}: unavailable {50 - starts} more times since the last report, 0 s in all: "
        f"{50 - starts} failed commands, {50 - starts} operations answered from the backup; "
        "available again",
        f"{FLAP_START} (unavailable 1 more time, 0 s in all, 1 more failed commands, "
        "1 operations answered from the backup since the last report)", FLAP_END]


def test_a_trouble_announced_late_says_what_came_before_it(
        shift_clock: Callable[[float], None], caplog: pytest.LogCaptureFixture) -> None:
    trouble = flapping_log()
    starts = MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL
    with caplog.at_level(logging.WARNING, logger="memtable.wire"):
        flap(trouble, shift_clock, starts + 3)
        for _ in range(4):  # a longer trouble, begun while the flapping was summed up
            trouble.failed("timeout after 1 s")
            trouble.answered_by_backup(2)
            shift_clock(20)
    assert [r.getMessage() for r in caplog.records][2 * starts:] == [
        f"{FLAP}: unavailable: timeout after 1 s; answering from the backup lmdb:bk "
        "(unavailable 3 more times, 0 s in all, 6 more failed commands, 9 operations "
        "answered from the backup since the last report)"]


def test_troubles_not_reported_yet_are_reported_at_close(
        shift_clock: Callable[[float], None], caplog: pytest.LogCaptureFixture) -> None:
    starts = MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL
    ended, going = flapping_log(), flapping_log()
    with caplog.at_level(logging.WARNING, logger="memtable.wire"):
        flap(ended, shift_clock, starts + 2)
        ended.close()
        flap(going, shift_clock, starts + 1)
        going.failed("SERVER_ERROR busy")
        shift_clock(3)
        going.close()
    assert [r.getMessage() for r in caplog.records if "more times" in r.getMessage()] == [
        f"{FLAP}: unavailable 2 more times since the last report, 0 s in all: 2 failed "
        "commands, 2 operations answered from the backup; available again",
        f"{FLAP}: unavailable 2 more times since the last report, 3 s in all: 2 failed "
        "commands, 1 operations answered from the backup; still unavailable at close"]


def test_a_flapping_server_cannot_flood_the_log(
        shift_clock: Callable[[float], None], caplog: pytest.LogCaptureFixture) -> None:
    """Whatever a server does, one kind of trouble logs at most 2 lines per
    announced start (and a summary) per interval, and every trouble is in
    some line."""
    rng = random.Random(15)
    trouble = flapping_log()
    stamps: list[float] = []
    troubles = 0
    with caplog.at_level(logging.WARNING, logger="memtable.wire"):
        for _ in range(20_000):
            if rng.random() < 0.5:
                troubles += not trouble.active
                trouble.failed("SERVER_ERROR busy")
            else:
                trouble.succeeded()
            if len(caplog.records) > len(stamps):
                stamps.append(clock.monotonic())
            shift_clock(rng.choice((0.001, 0.01, 0.1, 1.0)))
        trouble.succeeded()
        trouble.close()
    window = MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS
    assert len(caplog.records) == len(stamps) + 1  # the line at close
    most = max(bisect.bisect_left(stamps, t + window) - i for i, t in enumerate(stamps))
    assert most <= 2 * MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL + 2
    # Each trouble is in exactly one line: announced, or summed up.
    counted = 0
    for record in caplog.records:
        text = record.getMessage()
        if ": unavailable: " in text:
            counted += 1
        found = re.search(r"unavailable (\d+) more times?", text)
        counted += int(found.group(1)) if found else 0
    assert counted == troubles

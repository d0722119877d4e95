"""The memcache wire against real memcached servers, and against a hostile
fake (tests/hostile.py) for what real ones never send: every test that
takes ``make_wire`` runs on both drivers, MemcacheWire and
AsyncMemcacheWire (tests/wire_drivers.py)."""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memtable import clock
from memtable.endpoint import parse_endpoint
from memtable.errors import ProtocolError, ServerUnavailableError
from memtable.limits import MEMCACHE_GET_LINE_MAX_BYTES, MEMCACHE_PIPELINE_MAX_COMMANDS
from memtable.mcproto import chunks
from memtable.wire import MemcacheWire
from tests import hostile
from tests.conftest import Memcached, free_port, start_memcached

PAUSE = 0.5  # recorded, never slept: clock.sleep is replaced in every test


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every retry pause a wire asks for (nothing really sleeps)."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(clock, "sleep", recorded.append)
    monkeypatch.setattr(clock, "async_sleep", async_sleep)
    return recorded


def _wire_factory(driver: Callable[..., Any]) -> Iterator[Callable[..., MemcacheWire]]:
    made: list[MemcacheWire] = []

    def make(spec: str, **overrides: Any) -> MemcacheWire:
        settings: dict[str, Any] = {
            "timeout": 2.0, "max_try": 2, "retry_pause": PAUSE,
            "line_size_limit": 1024, "data_size_limit": 10240, "name": "test.cf"}
        settings.update(overrides)
        wire: MemcacheWire = driver(parse_endpoint(spec), **settings)
        made.append(wire)
        return wire

    yield make
    for wire in made:
        wire.close()


@pytest.fixture
def make_wire(wire_driver: Callable[..., Any]) -> Iterator[Callable[..., MemcacheWire]]:
    """Builds wires of the driver under test (both, by turns)."""
    yield from _wire_factory(wire_driver)


@pytest.fixture
def make_blocking_wire() -> Iterator[Callable[..., MemcacheWire]]:
    """Builds MemcacheWires: for set_many's ``while_waiting``, the blocking
    driver's own."""
    yield from _wire_factory(MemcacheWire)


# -- real memcached --------------------------------------------------------------


def test_set_get_delete_round_trip(memcached: Memcached,
                                   make_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_wire(memcached.spec)
    assert wire.get(b"k1") is None
    wire.set(b"k1", b"hello", flags=7, exptime=0)
    assert wire.get(b"k1") == (7, b"hello")
    assert memcached.meta("k1") == {"value": "hello", "ttl": -1, "flags": 7}
    assert wire.delete(b"k1") is True
    assert wire.delete(b"k1") is False
    assert wire.get(b"k1") is None


def test_gets_and_delete_unchanged(memcached: Memcached,
                                   make_wire: Callable[..., MemcacheWire]) -> None:
    """A cas-guarded delete: refused once the item was written after gets."""
    wire = make_wire(memcached.spec)
    assert wire.gets(b"k") is None
    assert wire.delete_unchanged(b"k", 1) is None  # NOT_FOUND
    wire.set(b"k", b"old", flags=3, exptime=0)
    flags, value, cas = wire.gets(b"k") or (0, b"", 0)
    assert (flags, value) == (3, b"old")
    wire.set(b"k", b"new", flags=3, exptime=0)  # written meanwhile
    assert wire.delete_unchanged(b"k", cas) is False  # EXISTS
    assert wire.get(b"k") == (3, b"new")
    _, _, cas = wire.gets(b"k") or (0, b"", 0)
    assert wire.delete_unchanged(b"k", cas) is True
    assert wire.get(b"k") is None and memcached.meta("k") is None


def test_values_are_binary_safe_and_exptime_is_sent(
        memcached: Memcached, make_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_wire(memcached.spec)
    value = bytes(range(256)) + b"\r\nEND\r\nVALUE x 0 1\r\n"
    wire.set(b"bin", value, flags=4294967295, exptime=0)
    assert wire.get(b"bin") == (4294967295, value)
    wire.set(b"ttl", b"t", flags=0, exptime=100)
    meta = memcached.meta("ttl")
    assert meta is not None and 95 <= int(str(meta["ttl"])) <= 100
    wire.set(b"empty", b"", flags=0, exptime=0)
    assert wire.get(b"empty") == (0, b"")


def test_get_many_returns_hits_only(memcached: Memcached,
                                    make_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_wire(memcached.spec)
    wire.set(b"a", b"1", flags=1, exptime=0)
    wire.set(b"b", b"2", flags=2, exptime=0)
    assert wire.get_many([b"a", b"missing", b"b", b"a"]) == {b"a": (1, b"1"), b"b": (2, b"2")}
    assert wire.get_many([]) == {}


def test_get_many_splits_long_key_lists(memcached: Memcached,
                                        make_wire: Callable[..., MemcacheWire]) -> None:
    keys = [b"key-%03d-" % i + b"x" * 40 for i in range(200)]
    split = chunks(keys)
    assert len(split) > 1
    assert all(len(b"get " + b" ".join(c) + b"\r\n") <= MEMCACHE_GET_LINE_MAX_BYTES
               for c in split)
    assert [k for c in split for k in c] == keys
    wire = make_wire(memcached.spec)
    wire.set_many([(k, k[::-1], 3, 0) for k in keys[::2]])
    assert wire.get_many(keys) == {k: (3, k[::-1]) for k in keys[::2]}


def test_set_many_pipelines_items_with_their_own_flags_and_exptime(
        memcached: Memcached, make_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_wire(memcached.spec)
    wire.set_many([(b"p1", b"one", 1, 0), (b"p2", b"two", 2, 300), (b"p1", b"uno", 5, 0)])
    assert memcached.meta("p1") == {"value": "uno", "ttl": -1, "flags": 5}
    p2 = memcached.meta("p2")
    assert p2 is not None and p2["flags"] == 2 and 295 <= int(str(p2["ttl"])) <= 300
    many = [(b"m%d" % i, b"v%d" % i, i, 0) for i in range(MEMCACHE_PIPELINE_MAX_COMMANDS * 2 + 3)]
    wire.set_many(many)
    got = wire.get_many([k for k, _, _, _ in many])
    assert got == {k: (f, v) for k, v, f, _ in many}
    wire.set_many([])


def test_value_at_data_size_limit_round_trips_and_one_more_byte_is_not_read(
        memcached: Memcached, make_wire: Callable[..., MemcacheWire],
        sleeps: list[float]) -> None:
    # Postfix's default limit: the value spans several reads.
    wire = make_wire(memcached.spec, data_size_limit=10240)
    fits = bytes(range(256)) * 40
    wire.set(b"fits", fits, flags=0, exptime=0)
    assert wire.get(b"fits") == (0, fits)
    with pytest.raises(ValueError, match="data_size_limit"):
        wire.set(b"over", b"o" * 10241, flags=0, exptime=0)
    # The server holds a larger value (stored by another client).
    memcached.raw(b"set over 0 0 10241\r\n" + b"o" * 10241 + b"\r\n")
    with pytest.raises(ProtocolError, match="over data_size_limit=10240"):
        wire.get(b"over")
    assert sleeps == [PAUSE]
    big = 512 * 1024
    memcached.raw(b"set big 0 0 %d\r\n" % big + b"b" * big + b"\r\n")
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="over data_size_limit"):
            wire.get(b"big")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # refused from the header: the value was never read
    # And the wire still works afterwards.
    assert wire.get(b"fits") == (0, fits)


def test_unix_socket(memcached_unix: Memcached,
                     make_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_wire(memcached_unix.spec)
    wire.set(b"u", b"unix value", flags=9, exptime=0)
    assert wire.get(b"u") == (9, b"unix value")
    assert wire.get_many([b"u", b"v"]) == {b"u": (9, b"unix value")}
    assert wire.delete(b"u") is True


def test_ipv6(tmp_path: Path, make_wire: Callable[..., MemcacheWire]) -> None:
    mc = start_memcached(tmp_path, extra=("-l", "::1"))
    try:
        wire = make_wire(f"inet:[::1]:{mc.port}")
        wire.set(b"six", b"v6", flags=6, exptime=0)
        assert wire.get(b"six") == (6, b"v6")
    finally:
        mc.stop()


def test_server_restart_between_calls_reconnects_without_retry_pause(
        tmp_path: Path, make_wire: Callable[..., MemcacheWire],
        sleeps: list[float]) -> None:
    mc = start_memcached(tmp_path)
    try:
        wire = make_wire(mc.spec)
        wire.set(b"r", b"before", flags=0, exptime=0)
        assert wire.get(b"r") == (0, b"before")
        mc.stop()
        mc = start_memcached(tmp_path, port=mc.port)
        assert wire.get(b"r") is None  # a fresh, empty server
        wire.set(b"r", b"after", flags=0, exptime=0)
        assert wire.get(b"r") == (0, b"after")
        assert sleeps == []
    finally:
        mc.stop()


def test_stopped_server_is_unavailable_after_one_attempt(
        tmp_path: Path, make_wire: Callable[..., MemcacheWire],
        sleeps: list[float]) -> None:
    mc = start_memcached(tmp_path)
    wire = make_wire(mc.spec, max_try=3)
    wire.set(b"s", b"x", flags=0, exptime=0)
    mc.stop()
    with pytest.raises(ServerUnavailableError) as info:
        wire.get(b"s")
    assert mc.spec in str(info.value) and "after 1 attempt" in str(info.value)
    assert sleeps == []


@pytest.mark.parametrize(("spec", "why"), [
    ("inet:127.0.0.1:{port}", "Connection refused"),
    ("unix:{tmp}/no-such.sock", "No such file or directory"),
])
def test_refused_connection_is_not_retried(
        spec: str, why: str, tmp_path: Path, make_wire: Callable[..., MemcacheWire],
        sleeps: list[float], caplog: pytest.LogCaptureFixture) -> None:
    spec = spec.format(port=free_port(), tmp=tmp_path)
    wire = make_wire(spec, max_try=3)
    with caplog.at_level(logging.WARNING, logger="memtable.wire"):
        for call in (lambda: wire.get(b"k"), lambda: wire.delete(b"k"),
                     lambda: wire.set(b"k", b"v", flags=0, exptime=0)):
            with pytest.raises(ServerUnavailableError, match=f"connect: {why}") as info:
                call()
            assert spec in str(info.value)
    assert sleeps == []
    # Three failed commands, one line: the outage is logged once.
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"memcache server {spec} (test.cf): unavailable: connect: ")


def test_set_must_see_stored(tmp_path: Path, make_wire: Callable[..., MemcacheWire],
                             sleeps: list[float]) -> None:
    mc = start_memcached(tmp_path, extra=("-I", "1024", "-o", "slab_chunk_max=1024"))
    try:
        wire = make_wire(mc.spec)
        with pytest.raises(ServerUnavailableError, match="SERVER_ERROR object too large"):
            wire.set(b"k", b"x" * 5000, flags=0, exptime=0)
        assert sleeps == [PAUSE]
        with pytest.raises(ServerUnavailableError, match="too large"):
            wire.set_many([(b"a", b"ok", 0, 0), (b"b", b"x" * 5000, 0, 0)])
        assert wire.get(b"a") == (0, b"ok")  # the connection recovers
    finally:
        mc.stop()


# -- caller errors: refused before any I/O -----------------------------------------


@pytest.mark.parametrize("key", [b"", b"a b", b"a\r\nb", b"tab\t", b"nul\x00",
                                 b"del\x7f", b"k" * 251])
def test_invalid_keys_are_refused_before_any_io(
        key: bytes, make_wire: Callable[..., MemcacheWire]) -> None:
    with hostile.HostileServer(hostile.stall()) as server:
        wire = make_wire(server.spec)
        for call in (lambda: wire.get(key), lambda: wire.get_many([b"ok", key]),
                     lambda: wire.delete(key),
                     lambda: wire.set(key, b"v", flags=0, exptime=0),
                     lambda: wire.set_many([(key, b"v", 0, 0)])):
            with pytest.raises(ValueError, match="not a valid memcache key"):
                call()
    assert server.connections == 0


def test_longest_key_and_non_ascii_keys_are_allowed(
        memcached: Memcached, make_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_wire(memcached.spec)
    for key in (b"k" * 250, "clé@exämple.com".encode()):
        wire.set(key, b"v", flags=0, exptime=0)
        assert wire.get(key) == (0, b"v")


@pytest.mark.parametrize(("flags", "exptime"), [(-1, 0), (2**32, 0), (0, -1), (0, 2**32)])
def test_flags_and_exptime_ranges(flags: int, exptime: int,
                                  make_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_wire("inet:127.0.0.1:1")
    with pytest.raises(ValueError, match="out of range"):
        wire.set(b"k", b"v", flags=flags, exptime=exptime)


def test_constructor_checks(wire_driver: Callable[..., Any]) -> None:
    ep = parse_endpoint("inet:127.0.0.1:1")
    with pytest.raises(ValueError):
        wire_driver(ep, timeout=1, max_try=0, retry_pause=1, line_size_limit=1,
                    data_size_limit=1)
    with pytest.raises(ValueError):
        wire_driver(ep, timeout=-1, max_try=1, retry_pause=1, line_size_limit=1,
                    data_size_limit=1)
    # timeout = 0 means "no limit" to Postfix: still bounded here.
    wire = wire_driver(ep, timeout=0, max_try=1, retry_pause=1, line_size_limit=1,
                       data_size_limit=1)
    assert 0 < wire.timeout < float("inf")
    wire.close()


# -- hostile servers -----------------------------------------------------------------

MAX_TRY = 3
# Short deadline for the stall and drip tests; the others answer at once and
# keep a roomy deadline so a loaded machine cannot turn them into timeouts.
TIMEOUT = 0.2


def hostile_wire(make_wire: Callable[..., MemcacheWire], server: hostile.HostileServer,
                 **overrides: Any) -> MemcacheWire:
    settings: dict[str, Any] = {"max_try": MAX_TRY, "timeout": 5.0}
    settings.update(overrides)
    return make_wire(server.spec, **settings)


def operations(wire: MemcacheWire) -> dict[str, Callable[[], object]]:
    return {
        "get": lambda: wire.get(b"k"),
        "set": lambda: wire.set(b"k", b"v", flags=0, exptime=0),
        "delete": lambda: wire.delete(b"k"),
        "set_many": lambda: wire.set_many([(b"k", b"v", 0, 0), (b"j", b"w", 0, 0)]),
    }


def test_one_gigabyte_value_header_is_refused_from_the_header(
        make_wire: Callable[..., MemcacheWire], sleeps: list[float]) -> None:
    script = hostile.flood(b"VALUE k 0 1073741824\r\n")
    with hostile.HostileServer(script) as server:
        wire = hostile_wire(make_wire, server)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="over data_size_limit=10240") as info:
                wire.get(b"k")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        wire.close()
    assert peak < 1024 * 1024
    assert f"after {MAX_TRY} attempts" in str(info.value)
    assert server.connections == MAX_TRY
    assert sleeps == [PAUSE] * (MAX_TRY - 1)


def test_endless_line_keeps_memory_bounded(make_wire: Callable[..., MemcacheWire],
                                           sleeps: list[float]) -> None:
    with hostile.HostileServer(hostile.flood(b"")) as server:
        wire = hostile_wire(make_wire, server)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="line_size_limit=1024"):
                wire.get(b"k")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        wire.close()
    assert peak < 1024 * 1024
    assert server.connections == MAX_TRY
    assert sleeps == [PAUSE] * (MAX_TRY - 1)


@pytest.mark.parametrize(("operation", "answer", "message"), [
    ("get", b"HELLO WORLD\r\n", "unexpected reply to get"),
    ("get", b"END\r\nX", "unexpected data after the reply"),
    ("get", b"END\n", "CRLF"),
    ("get", b"VALUE k 0 3\r\nabcdEND\r\n", "not followed by CRLF"),
    ("get", b"VALUE other 0 1\r\nx\r\nEND\r\n", "not asked for"),
    ("get", b"VALUE k 0 -1\r\n", "bad length"),
    ("get", b"ERROR\r\n", "ERROR"),
    ("get", b"CLIENT_ERROR bad command line format\r\n", "CLIENT_ERROR bad command"),
    ("set", b"STORED\r\nSTORED\r\n", "unexpected data after the reply"),
    ("set", b"DELETED\r\n", "unexpected reply to storage"),
    ("delete", b"STORED\r\n", "unexpected reply to delete"),
    ("set_many", b"STORED\r\nEND\r\n", "unexpected reply to storage"),
])
def test_broken_replies_are_protocol_errors_after_max_try(
        operation: str, answer: bytes, message: str,
        make_wire: Callable[..., MemcacheWire], sleeps: list[float],
        caplog: pytest.LogCaptureFixture) -> None:
    with hostile.HostileServer(hostile.reply(answer)) as server:
        wire = hostile_wire(make_wire, server)
        call = operations(wire)[operation]
        with (caplog.at_level(logging.DEBUG, logger="memtable.wire"),
              pytest.raises(ProtocolError, match=message) as info):
            call()
        wire.close()
    assert server.connections == MAX_TRY
    assert sleeps == [PAUSE] * (MAX_TRY - 1)
    assert server.spec in str(info.value) and "test.cf" in str(info.value)
    # Postfix logs the failures of the attempts after the first (memtable
    # at debug level), and memtable the trouble once, as a warning.
    assert "attempt 2 of 3" in caplog.text and "attempt 3 of 3" in caplog.text
    assert "attempt 1 of 3" not in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0], warnings
    assert "(after 3 attempts)" in warnings[0]


@pytest.mark.parametrize(("operation", "answer", "message"), [
    ("set", b"NOT_STORED\r\n", "NOT_STORED"),
    ("set", b"SERVER_ERROR out of memory storing object\r\n", "SERVER_ERROR out of memory"),
    ("set_many", b"STORED\r\nNOT_STORED\r\n", "NOT_STORED"),
    ("get", b"SERVER_ERROR busy\r\n", "SERVER_ERROR busy"),
    ("delete", b"SERVER_ERROR busy\r\n", "SERVER_ERROR busy"),
])
def test_server_failures_are_unavailable_after_max_try(
        operation: str, answer: bytes, message: str,
        make_wire: Callable[..., MemcacheWire], sleeps: list[float]) -> None:
    with hostile.HostileServer(hostile.reply(answer)) as server:
        wire = hostile_wire(make_wire, server)
        call = operations(wire)[operation]
        with pytest.raises(ServerUnavailableError, match=message):
            call()
        wire.close()
    assert server.connections == MAX_TRY
    assert sleeps == [PAUSE] * (MAX_TRY - 1)


def test_stall_is_bounded_by_the_timeout(make_wire: Callable[..., MemcacheWire],
                                         sleeps: list[float]) -> None:
    with hostile.HostileServer(hostile.stall()) as server:
        wire = hostile_wire(make_wire, server, timeout=TIMEOUT)
        with pytest.raises(ServerUnavailableError, match=r"timeout after 0\.2 s"):
            wire.get(b"k")
        wire.close()
    assert server.connections == MAX_TRY
    assert sleeps == [PAUSE] * (MAX_TRY - 1)


def test_slow_drip_cannot_stretch_an_attempt_past_its_deadline(
        make_wire: Callable[..., MemcacheWire], sleeps: list[float]) -> None:
    # Each byte comes well within the timeout, but the whole reply takes
    # ~0.75 s: only a per-attempt deadline stops it.
    answer = b"VALUE k 0 3\r\nabc\r\nEND\r\n"
    with hostile.HostileServer(hostile.drip(answer, 0.05)) as server:
        wire = hostile_wire(make_wire, server, timeout=TIMEOUT)
        with pytest.raises(ServerUnavailableError, match="timeout"):
            wire.get(b"k")
        wire.close()
    assert server.connections == MAX_TRY
    assert sleeps == [PAUSE] * (MAX_TRY - 1)


@pytest.mark.parametrize("partial", [b"", b"VALUE k 0 10\r\nabc", b"VALUE k 0 1\r\nx\r\n",
                                     b"EN"])
def test_mid_reply_disconnect(partial: bytes, make_wire: Callable[..., MemcacheWire],
                              sleeps: list[float]) -> None:
    with hostile.HostileServer(hostile.hang_up_after(partial)) as server:
        wire = hostile_wire(make_wire, server)
        with pytest.raises(ServerUnavailableError, match="closed by server"):
            wire.get(b"k")
        wire.close()
    assert server.connections == MAX_TRY
    assert sleeps == [PAUSE] * (MAX_TRY - 1)


def test_recovers_on_a_later_attempt(make_wire: Callable[..., MemcacheWire],
                                     sleeps: list[float]) -> None:
    good = hostile.reply(b"VALUE k 12 2\r\nok\r\nEND\r\n")
    bad = hostile.reply(b"garbage\r\n")

    def script(conn: Any, index: int) -> None:
        (bad if index == 0 else good)(conn, index)

    with hostile.HostileServer(script) as server:
        wire = hostile_wire(make_wire, server)
        assert wire.get(b"k") == (12, b"ok")
        wire.close()
    assert server.connections == 2
    assert sleeps == [PAUSE]


def test_late_data_on_an_idle_connection_drops_it_without_an_attempt(
        make_wire: Callable[..., MemcacheWire], sleeps: list[float],
        caplog: pytest.LogCaptureFixture) -> None:
    junk_sent = threading.Event()

    def script(conn: Any, index: int) -> None:
        hostile.read_command(conn)
        if index == 0:
            conn.sendall(b"END\r\n")
            # Long enough for the client to finish with the reply first.
            time.sleep(0.05)
            conn.sendall(b"late junk\r\n")
            junk_sent.set()
            hostile.wait_client_gone(conn)
        else:
            conn.sendall(b"VALUE k 0 1\r\nx\r\nEND\r\n")
            hostile.wait_client_gone(conn)

    with hostile.HostileServer(script) as server:
        wire = hostile_wire(make_wire, server)
        assert wire.get(b"k") is None
        assert junk_sent.wait(5)
        with caplog.at_level(logging.WARNING, logger="memtable.wire"):
            assert wire.get(b"k") == (0, b"x")
        wire.close()
    assert "unexpected data" in caplog.text and "idle connection" in caplog.text
    assert server.connections == 2
    assert sleeps == []


def test_set_many_sends_all_commands_in_one_write(
        make_wire: Callable[..., MemcacheWire]) -> None:
    items = [(b"k%d" % i, b"value %d" % i, i, 60) for i in range(5)]
    expected = b"".join(b"set %s %d %d %d\r\n%s\r\n" % (k, f, e, len(v), v)
                        for k, v, f, e in items)
    received: list[bytes] = []

    def script(conn: Any, index: int) -> None:
        buf = b""
        while len(buf) < len(expected):  # no reply before the whole batch arrived
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        received.append(buf)
        conn.sendall(b"STORED\r\n" * len(items))
        hostile.wait_client_gone(conn)

    with hostile.HostileServer(script) as server:
        wire = hostile_wire(make_wire, server)
        wire.set_many(items)
        wire.close()
    assert received == [expected]
    assert server.connections == 1


def test_a_server_that_timed_out_is_held_down(make_wire: Callable[..., MemcacheWire],
                                              sleeps: list[float],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """After a timeout on every attempt, calls fail at once (no connection,
    no wait) until the hold-down ends; then the server is tried again."""
    with hostile.HostileServer(hostile.stall()) as server:
        wire = hostile_wire(make_wire, server, timeout=TIMEOUT)
        wire.core.down_hold_seconds = 0.3
        with pytest.raises(ServerUnavailableError, match="timeout"):
            wire.get(b"k")
        assert server.connections == MAX_TRY
        for call in (lambda: wire.get(b"k"), lambda: wire.delete(b"k"),
                     lambda: wire.set(b"k", b"v", flags=0, exptime=0)):
            with pytest.raises(ServerUnavailableError, match="held down"):
                call()
        assert server.connections == MAX_TRY
        time.sleep(0.35)
        with pytest.raises(ServerUnavailableError, match="timeout"):
            wire.get(b"k")
        assert server.connections == 2 * MAX_TRY
        wire.close()


# -- set_many's meanwhile: the caller's work overlaps the round trip ----------


def test_set_many_meanwhile_runs_after_the_write_and_before_the_reply(
        make_blocking_wire: Callable[..., MemcacheWire]) -> None:
    items = [(b"k%d" % i, b"v", 0, 0) for i in range(3)]
    size = sum(len(b"set %s 0 0 1\r\nv\r\n" % k) for k, _, _, _ in items)
    ran = threading.Event()
    seen_before_reply: list[bool] = []

    def script(conn: Any, index: int) -> None:
        buf = b""
        while len(buf) < size:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        # The work must be done while this reply is still unsent.
        seen_before_reply.append(ran.wait(hostile.IO_TIMEOUT))
        conn.sendall(b"STORED\r\n" * len(items))
        hostile.wait_client_gone(conn)

    calls: list[int] = []
    with hostile.HostileServer(script) as server:
        wire = hostile_wire(make_blocking_wire, server)
        wire.set_many(items, while_waiting=lambda: (calls.append(1), ran.set()))
        wire.close()
    assert seen_before_reply == [True]
    assert calls == [1]


def test_set_many_meanwhile_time_does_not_count_against_the_timeout(
        memcached: Memcached, make_blocking_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_blocking_wire(memcached.spec, timeout=0.1, max_try=1)
    wire.set_many([(b"slow", b"work", 0, 0)], while_waiting=lambda: time.sleep(0.3))
    assert wire.get(b"slow") == (0, b"work")


def test_set_many_meanwhile_runs_once_when_nothing_could_be_sent(
        make_blocking_wire: Callable[..., MemcacheWire]) -> None:
    wire = make_blocking_wire(f"inet:127.0.0.1:{free_port()}")  # nobody listens
    calls: list[int] = []
    with pytest.raises(ServerUnavailableError):
        wire.set_many([(b"k", b"v", 0, 0)], while_waiting=lambda: calls.append(1))
    assert calls == [1]


def test_set_many_meanwhile_runs_once_across_attempts(
        make_blocking_wire: Callable[..., MemcacheWire], sleeps: list[float]) -> None:
    def script(conn: Any, index: int) -> None:
        hostile.read_command(conn)
        if index == 0:
            return  # hang up: the batch is sent again on a new connection
        conn.sendall(b"STORED\r\n")
        hostile.wait_client_gone(conn)

    calls: list[int] = []
    with hostile.HostileServer(script) as server:
        wire = hostile_wire(make_blocking_wire, server)
        wire.set_many([(b"k", b"v", 0, 0)], while_waiting=lambda: calls.append(1))
        wire.close()
    assert server.connections == 2
    assert calls == [1]


def test_any_failure_to_look_the_host_up_is_unavailable(
        wire_driver: Callable[..., Any]) -> None:
    """A name Python cannot even encode (an empty label: UnicodeError, not
    OSError) is an unavailable server, so a backup answers; configuration
    files never get this far (memtable.endpoint refuses such names)."""
    from memtable.endpoint import Endpoint

    wire = wire_driver(Endpoint("inet", host="mc..example.com", port=11211), timeout=2,
                       max_try=2, retry_pause=PAUSE, line_size_limit=1024,
                       data_size_limit=10240, name="test.cf")
    with pytest.raises(ServerUnavailableError, match="host lookup failed: UnicodeError"):
        wire.get(b"k")
    with pytest.raises(ServerUnavailableError, match="held down"):
        wire.get(b"k")
    wire.close()

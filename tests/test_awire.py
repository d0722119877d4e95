"""What only the asyncio driver has: tasks sharing one connection, a caller
cancelling an operation, the host lookup awaited on the event loop.  The
rest of its behaviour is MemcacheWire's, tested on both drivers in
tests/test_wire.py and tests/test_memcache_trouble.py."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from memtable.awire import AsyncMemcacheWire
from memtable.endpoint import parse_endpoint
from memtable.errors import ServerUnavailableError
from tests import hostile
from tests.conftest import Memcached


def make(spec: str, **overrides: Any) -> AsyncMemcacheWire:
    settings: dict[str, Any] = {
        "timeout": 5.0, "max_try": 2, "retry_pause": 0.0,
        "line_size_limit": 1024, "data_size_limit": 10240, "name": "test.cf"}
    settings.update(overrides)
    return AsyncMemcacheWire(parse_endpoint(spec), **settings)


def connections_made(memcached: Memcached) -> int:
    stats = memcached.raw(b"stats\r\n").decode()
    for line in stats.splitlines():
        if line.startswith("STAT total_connections "):
            return int(line.split()[2])
    raise AssertionError(stats)


def test_concurrent_tasks_take_turns_on_one_connection(memcached: Memcached) -> None:
    async def main() -> list[object]:
        wire = make(memcached.spec)
        try:
            async def one(n: int) -> object:
                key = b"t%d" % n
                await wire.set(key, b"value %d" % n, flags=n, exptime=0)
                got = await wire.get(key)
                many = await wire.get_many([key, b"missing"])
                assert many == {key: got}
                return got
            return await asyncio.gather(*(one(n) for n in range(50)))
        finally:
            await wire.close()

    before = connections_made(memcached)
    results = asyncio.run(main())
    assert results == [(n, b"value %d" % n) for n in range(50)]
    # One connection for the wire (and one for each stats command).
    assert connections_made(memcached) - before == 2


def test_a_wire_outlives_its_event_loop(memcached: Memcached) -> None:
    """A wire used again under a new event loop (asyncio.run() twice):
    the connection of the ended loop is closed and a new one opened at
    once, without an error or a timeout."""
    wire = make(memcached.spec, max_try=1)
    before = connections_made(memcached)
    asyncio.run(wire.set(b"k", b"v", flags=1, exptime=0))
    assert asyncio.run(wire.get(b"k")) == (1, b"v")
    asyncio.run(wire.close())
    assert connections_made(memcached) - before == 3  # two for the wire, one for stats


def test_a_cancelled_operation_drops_the_connection() -> None:
    """A caller's timeout cancels the operation mid-reply: the connection,
    in an unknown state, is dropped and the next operation opens another
    (whose reply is not mistaken for the cancelled one's)."""
    def script(conn: Any, index: int) -> None:
        hostile.read_command(conn)
        if index == 0:
            conn.sendall(b"VALUE k 0 5\r\nst")  # then nothing: the caller gives up
            hostile.wait_client_gone(conn)
            return
        conn.sendall(b"VALUE k 3 5\r\nfresh\r\nEND\r\n")
        hostile.wait_client_gone(conn)

    async def main(server: hostile.HostileServer) -> object:
        wire = make(server.spec)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await wire.get(b"k")
            return await wire.get(b"k")
        finally:
            await wire.close()

    with hostile.HostileServer(script) as server:
        assert asyncio.run(main(server)) == (3, b"fresh")
    assert server.connections == 2


ASYNC_LOOKUP = textwrap.dedent("""
    import asyncio, threading, time
    from memtable.awire import AsyncMemcacheWire
    from memtable.endpoint import Endpoint
    from memtable.errors import ServerUnavailableError

    async def main():
        wire = AsyncMemcacheWire(Endpoint("inet", host="memcache.stall.test", port=11211),
                                 timeout=1, max_try=2, retry_pause=0, line_size_limit=1024,
                                 data_size_limit=10240, name="t.cf")
        ticks = 0
        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1
        task = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            await wire.get(b"k")
        except ServerUnavailableError as exc:
            print("error:", exc)
        print("waited:", round(time.monotonic() - started))
        print("loop ran:", ticks >= 10)
        try:
            await wire.get(b"k")
        except ServerUnavailableError as exc:
            print("error:", exc)
        wire.core.down_until = 0.0  # end the hold-down: the same lookup is awaited again
        try:
            await wire.get(b"k")
        except ServerUnavailableError as exc:
            print("error:", exc)
        print("lookup threads:", sum(t.name.startswith("memtable lookup")
                                     for t in threading.enumerate()))
        task.cancel()
        await wire.close()

    asyncio.run(main())
""")


def test_host_lookup_that_never_answers_is_bounded_and_leaves_the_loop_free(
        tmp_path: Path) -> None:
    """A DNS server that never answers: the lookup (in its one thread) is
    awaited within the attempt's timeout while the event loop runs other
    tasks; the server is then held down; a later attempt awaits the same
    lookup instead of starting a second thread."""
    with hostile.PrivateResolver(tmp_path) as resolver:
        done = subprocess.run(resolver.wrap([sys.executable, "-c", ASYNC_LOOKUP]),
                              capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("error: memcache server inet:memcache.stall.test:11211 (t.cf): "
                        "connect: host lookup of memcache.stall.test: no answer within 1 s "
                        "(after 1 attempt)"), done.stdout
    assert lines[1:3] == ["waited: 1", "loop ran: True"], done.stdout
    assert "held down" in lines[3], done.stdout
    assert "no answer within 1 s" in lines[4], done.stdout
    assert lines[5] == "lookup threads: 1", done.stdout


@pytest.mark.parametrize("late", [b"late junk\r\n", b""])
def test_what_the_loop_sees_on_an_idle_connection_drops_it_without_an_attempt(
        late: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """The event loop runs between two operations and reads what the server
    sends (or its hang-up) on the idle connection: the next operation opens
    a new connection at once, without costing an attempt or a pause."""
    def script(conn: Any, index: int) -> None:
        hostile.read_command(conn)
        conn.sendall(b"END\r\n" if index == 0 else b"VALUE k 0 1\r\nx\r\nEND\r\n")
        if index == 0:
            time.sleep(0.05)  # the client has the reply first
            if not late:
                return  # hang up
            conn.sendall(late)
        hostile.wait_client_gone(conn)

    async def main() -> tuple[object, object]:
        wire = make(hostile_spec, max_try=1)
        try:
            first = await wire.get(b"k")
            await asyncio.sleep(0.2)  # the loop reads the junk or the EOF
            with caplog.at_level(logging.DEBUG, logger="memtable.wire"):
                return first, await wire.get(b"k")
        finally:
            await wire.close()

    with hostile.HostileServer(script) as server:
        hostile_spec = server.spec
        assert asyncio.run(main()) == (None, (0, b"x"))
    assert server.connections == 2
    if late:
        assert "unexpected data" in caplog.text and "late junk" in caplog.text
    else:
        assert "closed the idle connection" in caplog.text


def test_each_command_is_held_to_its_own_deadline_by_the_connections_one_timer() -> None:
    """The connection's one deadline timer, armed by an earlier command,
    fires while a later command waits for its reply: the later command
    is not cut short (its own deadline is later), and still times out at
    its own deadline, as the only attempt."""
    def script(conn: Any, index: int) -> None:
        hostile.read_command(conn)
        conn.sendall(b"END\r\n")  # the first command's reply
        hostile.read_command(conn)  # the second: never answered
        hostile.wait_client_gone(conn)

    async def main() -> tuple[object, float, float]:
        loop = asyncio.get_running_loop()
        wire = make(hostile_spec, timeout=0.6, max_try=1)
        try:
            first = await wire.get(b"k")
            await asyncio.sleep(0.3)  # the timer's deadline now falls in the next command
            started = loop.time()
            with pytest.raises(ServerUnavailableError, match=r"timeout after 0\.6 s"):
                await wire.get(b"k")
            return first, started, loop.time()
        finally:
            await wire.close()

    with hostile.HostileServer(script) as server:
        hostile_spec = server.spec
        first, started, ended = asyncio.run(main())
    assert first is None
    assert ended - started >= 0.6  # not at the first command's deadline
    assert server.connections == 1

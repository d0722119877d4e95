"""The memcache connection of a memcache: table, asyncio driver.

AsyncMemcacheWire is MemcacheWire (memtable.wire) on an event loop, with no
thread between the loop and memcached: the same constructor, the same
operations as coroutines, the same rules, because both drive the same core
(memtable.mcproto) and only the I/O differs:

- the command is framed first (the core's capture) and written to the
  connection's transport; its protocol (_Stream) hands every chunk received
  to the core until the core says the reply is complete; pymemcache then
  parses it (replay).  A transport keeps the socket registered with the
  loop's selector: no epoll_ctl() per command, as loop.sock_recv() would
  make;
- each attempt (connect + command + reply) is held to one deadline of
  ``timeout`` seconds: asyncio.timeout_at() around the connect, the
  connection's one deadline timer (_Stream) for the command and its reply;
- the host name is looked up by memtable.wire.HostLookup (at most one
  thread stuck in getaddrinfo() per target), awaited under the same
  deadline;
- retry_pause is awaited through the clock seam (clock.async_sleep).

One connection per wire; operations of concurrent tasks take turns on it
(an asyncio.Lock).  An operation cancelled by its caller (a timeout around
it) drops the connection, whose state is then unknown: the next operation
opens a new one.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections.abc import Sequence
from typing import Any, TypeVar, Unpack

from memtable import clock
from memtable.endpoint import Endpoint
from memtable.limits import RECV_CHUNK_BYTES
from memtable.mcproto import Attempts, Item, Request
from memtable.wire import DriverBase, WireSettings, idle_connection_usable, log_idle_drop

T = TypeVar("T")


class AsyncMemcacheWire(DriverBase):
    """One persistent connection to one memcached, with Postfix's retries,
    for one event loop.

    Every operation raises ServerUnavailableError or ProtocolError when all
    attempts fail, and ValueError for invalid keys, flags or exptimes
    before any I/O, exactly as MemcacheWire's do.
    """

    def __init__(self, endpoint: Endpoint, **settings: Unpack[WireSettings]) -> None:
        super().__init__(endpoint, **settings)
        self._stream: _Stream | None = None
        self._lock = asyncio.Lock()

    # -- operations (as MemcacheWire's) ------------------------------------------

    async def get(self, key: bytes) -> tuple[int, bytes] | None:
        """(flags, value) for key, or None when memcached has no such item."""
        return await self._run(self.core.get(key))

    async def get_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, bytes]]:
        """The hits among keys, as {key: (flags, value)} (no partial result)."""
        requests = self.core.get_many(keys)
        if len(requests) == 1:
            return await self._run(requests[0])
        hits: dict[bytes, tuple[int, bytes]] = {}
        for request in requests:
            got: dict[bytes, tuple[int, bytes]] = await self._run(request)
            hits.update(got)
        return hits

    async def set(self, key: bytes, value: bytes, *, flags: int, exptime: int) -> None:
        """Store key = value; only a STORED reply counts as success."""
        await self._run(self.core.set(key, value, flags, exptime))

    async def set_many(self, items: Sequence[Item]) -> None:
        """Store (key, value, flags, exptime) items, pipelined as
        MemcacheWire.set_many does (no ``while_waiting``: the caller's own work
        runs in another task meanwhile)."""
        for request in self.core.set_many(items):
            await self._run(request)

    async def gets(self, key: bytes) -> tuple[int, bytes, int] | None:
        """(flags, value, cas unique) for key, or None."""
        return await self._run(self.core.gets(key))

    async def delete_unchanged(self, key: bytes, cas: int) -> bool | None:
        """Remove key only if unchanged since the ``gets`` that gave ``cas``
        (MemcacheWire.delete_unchanged)."""
        return await self._run(self.core.delete_unchanged(key, cas))

    async def delete(self, key: bytes) -> bool:
        """Remove key: True when memcached said DELETED, False for NOT_FOUND."""
        return await self._run(self.core.delete(key))

    async def delete_many(self, keys: Sequence[bytes]) -> None:
        """Remove keys, pipelined (DELETED and NOT_FOUND both done)."""
        for request in self.core.delete_many(keys):
            await self._run(request)

    async def close(self) -> None:
        """Drop the connection (after the operation in progress, if any),
        and log the troubles not reported yet."""
        async with self._lock:
            self._drop()
            self.core.close()

    # -- attempts ------------------------------------------------------------

    async def _run(self, request: Request[T]) -> T:
        # acquire()/release() rather than ``async with``: two coroutines
        # fewer per command (docs/design.md, "The memcache core and its
        # two drivers").
        lock = self._lock
        await lock.acquire()
        try:
            core = self.core
            attempts = core.attempts(request)
            data = core.capture(request)
            while (pause := attempts.next_attempt()) is not None:
                if pause:
                    await clock.async_sleep(pause)
                try:
                    stream = self._idle_stream()
                    if stream is None:
                        loop = asyncio.get_running_loop()
                        deadline = loop.time() + core.timeout
                        stream = await self._connection(loop, deadline)
                    else:
                        # The connection's loop is the running one: no
                        # get_running_loop(), a getpid() on Python 3.11.
                        deadline = stream.loop.time() + core.timeout
                except OSError as exc:
                    attempts.connect_failed(exc)
                    break
                attempts.connected()
                try:
                    reply = await stream.exchange(data, attempts, deadline)
                    result = core.replay(request, reply)
                except Exception as exc:
                    self._drop()
                    if not attempts.failed(exc):
                        raise
                    continue
                except BaseException:
                    self._drop()  # cancelled mid-exchange: the state is unknown
                    raise
                attempts.succeeded()
                return result
            raise attempts.give_up()
        finally:
            lock.release()

    def _idle_stream(self) -> _Stream | None:
        """The open connection, if it can take a command: one that the
        server closed or wrote to while idle is dropped before reuse,
        without costing an attempt (as MemcacheWire), whether the loop has
        seen it yet or not."""
        stream = self._stream
        if stream is None:
            return None
        if stream.loop.is_closed():
            pass  # opened on an event loop that has ended (asyncio.run() again)
        elif stream.lost:
            log_idle_drop(self.name, self.endpoint, stream.idle_data)
        elif idle_connection_usable(stream.sock, stream.poller, self.name, self.endpoint):
            return stream
        self._drop()
        return None

    async def _connection(self, loop: asyncio.AbstractEventLoop,
                          deadline: float) -> _Stream:
        """A new connection, open by the deadline."""
        sock = await self._connect(loop, deadline)
        try:
            if self.endpoint.kind == "unix":
                _, stream = await loop.create_unix_connection(
                    lambda: _Stream(sock, loop), sock=sock)
            else:
                _, stream = await loop.create_connection(lambda: _Stream(sock, loop), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._stream = stream
        return stream

    async def _connect(self, loop: asyncio.AbstractEventLoop,
                       deadline: float) -> socket.socket:
        ep = self.endpoint
        if ep.kind == "unix":
            return await _open(loop, socket.AF_UNIX, socket.SOCK_STREAM, 0, ep.path, deadline)
        lookup = self._lookup
        assert lookup is not None
        pending = lookup.future()
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.wrap_future(pending)
        except TimeoutError:
            raise lookup.too_slow() from None
        except socket.gaierror:
            pass  # raised by answered()
        last: OSError = OSError(f"no address for {ep.host}")
        for family, type_, proto, _, addr in lookup.answered(pending):
            if loop.time() >= deadline:
                raise TimeoutError("connect timed out")
            try:
                sock = await _open(loop, family, type_, proto, addr, deadline)
            except OSError as exc:
                last = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


class _Stream(asyncio.BufferedProtocol):
    """One connection's protocol: every chunk received goes to the attempt
    in progress (the core's Attempts) until the reply is complete.

    The transport reads into a buffer of RECV_CHUNK_BYTES (a plain
    Protocol's transport reads 256 KiB at a time): the guard refuses an
    oversized value from its header before more than that is read.

    Each exchange is held to its deadline by one timer per connection, not
    one per command: a timer armed for an earlier command's deadline that
    fires while a later command is in progress is armed again for that
    command's deadline (deadlines only move later; one that moved earlier
    is armed at once).  So a command costs no timer of its own, and a reply
    still times out at its deadline (docs/design.md, "The memcache core
    and its two drivers")."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock  # the transport's: for the idle check
        self.loop = loop
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self._buffer = bytearray(RECV_CHUNK_BYTES)
        self.transport: asyncio.Transport | None = None
        self.attempts: Attempts | None = None
        self.waiter: asyncio.Future[bytes] | None = None  # the whole reply, when complete
        self.deadline = 0.0    # the exchange in progress's (loop time)
        self.timer: asyncio.TimerHandle | None = None
        self.armed = 0.0       # the deadline the timer was armed for
        self.lost = False      # closed, by either side: never used again
        self.idle_data = b""   # what the server sent while no command was in progress

    async def exchange(self, data: bytes, attempts: Attempts, deadline: float) -> bytes:
        """Send a command; its whole reply, once the core has checked it;
        TimeoutError at ``deadline`` (loop time).  A timer on the waiter
        rather than asyncio.timeout_at(), which would add a context
        manager, the task's cancellation and its undoing to every command."""
        transport = self.transport
        assert transport is not None and self.waiter is None
        waiter: asyncio.Future[bytes] = self.loop.create_future()
        self.deadline = deadline
        if self.timer is None or self.armed > deadline:
            self._arm(deadline)
        self.waiter, self.attempts = waiter, attempts
        try:
            transport.write(data)
            return await waiter
        finally:
            self.waiter = self.attempts = None

    def _arm(self, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(deadline, self._timer_fired)
        self.armed = deadline

    def _timer_fired(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # idle: the next exchange arms it again
        if self.deadline > self.armed:
            self._arm(self.deadline)  # armed for an earlier command
        else:
            waiter.set_exception(TimeoutError())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        with memoryview(self._buffer) as view:
            data = bytes(view[:nbytes])
        waiter, attempts = self.waiter, self.attempts
        if waiter is None or attempts is None or waiter.done():
            # No memcached speaks unasked: drop the connection (logged at
            # its next use, as MemcacheWire does).
            if not self.idle_data:
                self.idle_data = data[:40]
            self.close()
            return
        try:
            reply = attempts.receive(data)
            if reply is not None:
                waiter.set_result(reply)
        except Exception as exc:  # ProtocolError: the guard found a violation
            waiter.set_exception(exc)

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._ended(exc)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _ended(self, exc: Exception | None) -> None:
        self.lost = True
        waiter, attempts = self.waiter, self.attempts
        if waiter is None or attempts is None or waiter.done():
            return
        if exc is not None:
            waiter.set_exception(exc)
            return
        try:
            attempts.receive(b"")  # the core says what an early end is
        except Exception as ended:
            waiter.set_exception(ended)

    def close(self) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.loop.is_closed():
            self.sock.close()  # its transport can no longer schedule its own close
        elif self.transport is not None:
            self.transport.close()


async def _open(loop: asyncio.AbstractEventLoop, family: int, type_: int, proto: int,
                address: tuple[Any, ...] | str, deadline: float) -> socket.socket:
    """A non-blocking socket connected to address by the deadline."""
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        async with asyncio.timeout_at(deadline):
            await loop.sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        if exc.errno and not isinstance(exc, TimeoutError):
            # asyncio says "Connect call failed (address)"; the messages
            # say what the blocking connect says ("Connection refused").
            raise OSError(exc.errno, os.strerror(exc.errno)) from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock

"""The memcache connection of a memcache: table, asyncio driver.

AsyncMemcacheWire is MemcacheWire (memtable.wire) on an event loop, with no
thread between the loop and memcached: the same constructor, the same
operations as coroutines, the same rules, because both drive the same core
(memtable.mcproto) and only the I/O differs:

- the command is framed first (the core's capture), sent with
  loop.sock_sendall(), and the reply read with loop.sock_recv() until the
  core says it is complete; pymemcache then parses it (replay);
- each attempt (connect + command + reply) is held to one deadline of
  ``timeout`` seconds with asyncio.timeout_at();
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
from typing import Any, TypeVar

from memtable import clock
from memtable.endpoint import Endpoint
from memtable.limits import RECV_CHUNK_BYTES
from memtable.mcproto import Item, McCore, Request
from memtable.wire import host_lookup, idle_connection_usable

T = TypeVar("T")


class AsyncMemcacheWire:
    """One persistent connection to one memcached, with Postfix's retries,
    for one event loop.

    Every operation raises ServerUnavailableError or ProtocolError when all
    attempts fail, and ValueError for invalid keys, flags or exptimes
    before any I/O, exactly as MemcacheWire's do.
    """

    def __init__(self, endpoint: Endpoint, *, timeout: float, max_try: int,
                 retry_pause: float, line_size_limit: int, data_size_limit: int,
                 name: str = "", fallback: str = "") -> None:
        self.core = McCore(endpoint, timeout=timeout, max_try=max_try,
                           retry_pause=retry_pause, line_size_limit=line_size_limit,
                           data_size_limit=data_size_limit, name=name, fallback=fallback)
        self.endpoint = endpoint
        self.name = self.core.name
        self.timeout = self.core.timeout
        self.fallback = fallback
        self._sock: socket.socket | None = None
        self._poller: select.poll | None = None
        self._lookup = host_lookup(endpoint, self.core.timeout)
        self._lock = asyncio.Lock()

    @property
    def writable(self) -> bool:
        """False while memcached is unavailable or refusing writes."""
        return self.core.writable

    def answered_by_backup(self, count: int = 1) -> None:
        """Count operations the backup answered because a command failed."""
        self.core.answered_by_backup(count)

    # -- operations (as MemcacheWire's) ------------------------------------------

    async def get(self, key: bytes) -> tuple[int, bytes] | None:
        """(flags, value) for key, or None when memcached has no such item."""
        return await self._run(self.core.get(key))

    async def get_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, bytes]]:
        """The hits among keys, as {key: (flags, value)} (no partial result)."""
        hits: dict[bytes, tuple[int, bytes]] = {}
        for request in self.core.get_many(keys):
            got: dict[bytes, tuple[int, bytes]] = await self._run(request)
            hits.update(got)
        return hits

    async def set(self, key: bytes, value: bytes, *, flags: int, exptime: int) -> None:
        """Store key = value; only a STORED reply counts as success."""
        await self._run(self.core.set(key, value, flags, exptime))

    async def set_many(self, items: Sequence[Item]) -> None:
        """Store (key, value, flags, exptime) items, pipelined as
        MemcacheWire.set_many does (no ``meanwhile``: the caller's own work
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
        async with self._lock:
            core = self.core
            attempts = core.attempts(request)
            data = core.capture(request)
            loop = asyncio.get_running_loop()
            while (pause := attempts.next_attempt()) is not None:
                if pause:
                    await clock.async_sleep(pause)
                deadline = loop.time() + core.timeout
                try:
                    sock = await self._connection(loop, deadline)
                except OSError as exc:
                    attempts.connect_failed(exc)
                    break
                attempts.connected()
                try:
                    async with asyncio.timeout_at(deadline):
                        await loop.sock_sendall(sock, data)
                        receive = attempts.receive
                        while not receive(await loop.sock_recv(sock, RECV_CHUNK_BYTES)):
                            pass
                    result = core.replay(request, attempts.reply())
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

    async def _connection(self, loop: asyncio.AbstractEventLoop,
                          deadline: float) -> socket.socket:
        sock, poller = self._sock, self._poller
        if sock is not None and poller is not None:
            if idle_connection_usable(sock, poller, self.name, self.endpoint):
                return sock
            self._drop()
        sock = await self._connect(loop, deadline)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._sock = sock
        return sock

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
        sock, self._sock, self._poller = self._sock, None, None
        if sock is not None:
            sock.close()


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

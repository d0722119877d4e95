"""The memcache connection of a memcache: table, blocking driver.

MemcacheWire does the I/O of one memcached connection; every rule lives in
the core, memtable.mcproto (framing by pymemcache, the ReplyGuard, Postfix's
max_try/retry_pause, the hold-down, the refusals, the outage log, the key
checks).  memtable.awire is the same on asyncio.  What the drivers share
lives here: the bounded host lookup (HostLookup) and the idle-connection
check.

Postfix's dict_memcache, as the core applies it: up to max_try attempts per
command, retry_pause seconds apart, with the connection dropped and reopened
after any failure; no further attempt once connecting fails; a ``set``
counts only when the server says STORED; line_size_limit / data_size_limit
on every reply.  Each attempt (connect + command + reply) has one deadline
of ``timeout`` seconds, so a server dripping a byte at a time cannot stretch
it.  Differences from Postfix, all stricter: trailing bytes after a reply, a
bare LF line end or a VALUE for a key not asked for are protocol errors;
``timeout = 0`` (no limit to Postfix) is bounded by
limits.MEMCACHE_UNLIMITED_TIMEOUT_SECONDS.  Like Postfix's event loop
(auto_clnt_event), an idle connection that the server closed or wrote to is
dropped before reuse, without costing an attempt.  A server that timed out
on every attempt, or whose host name could not be looked up, is "held
down": calls fail at once for limits.MEMCACHE_DOWN_HOLD_SECONDS.  With a
``fallback`` (the table's backup), a write that memcached refuses is not
retried.

The host name is looked up at every new connection in a worker thread
(HostLookup), within the attempt's deadline: getaddrinfo() cannot be
interrupted, and a DNS server that never answers would hold it for as long
as resolv.conf allows (30 s and more).  Any failure of the lookup is an
unavailable server, never another exception.

A MemcacheWire is NOT thread-safe: use one per thread.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Required, TypedDict, TypeVar, Unpack

from memtable import clock
from memtable.endpoint import Endpoint
from memtable.limits import MEMCACHE_DEADLINE_SLACK_SECONDS, RECV_CHUNK_BYTES
from memtable.mcproto import Attempts, Item, LookupTimeout, McCore, Request, log

T = TypeVar("T")

Addresses = list[tuple[Any, ...]]


class HostLookup:
    """The addresses of one host:port, looked up in a worker thread.

    future() hands out the lookup in flight (or starts one): the blocking
    driver waits for it with a timeout, the asyncio driver awaits it under
    asyncio.timeout.  A lookup that outlives its caller's wait stays in
    flight and the next caller waits for that same lookup, so at most one
    thread per connection target is ever stuck in the resolver.  An IP
    address needs no resolver and is converted in the caller's thread.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout  # for messages: the deadlines are the caller's
        try:
            ipaddress.ip_address(host)
            self.numeric = True
        except ValueError:
            self.numeric = False
        self._pending: concurrent.futures.Future[Addresses] | None = None

    def future(self) -> concurrent.futures.Future[Addresses]:
        """The lookup's answer to come: getaddrinfo()'s list, or
        socket.gaierror for any failure of the lookup."""
        if self.numeric:
            done: concurrent.futures.Future[Addresses] = concurrent.futures.Future()
            try:
                done.set_result(socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC,
                                                   socket.SOCK_STREAM, 0,
                                                   socket.AI_NUMERICHOST))
            except socket.gaierror as exc:
                done.set_exception(exc)
            return done
        lookup = self._pending
        if lookup is None:
            lookup = self._pending = concurrent.futures.Future()
            # Running: a waiter that gives up cannot cancel it.
            lookup.set_running_or_notify_cancel()
            threading.Thread(target=self._run, args=(lookup,), daemon=True,
                             name=f"memtable lookup {self.host}").start()
        return lookup

    def answered(self, lookup: concurrent.futures.Future[Addresses]) -> Addresses:
        """The answer of a finished lookup (taken: the next is a new one)."""
        if self._pending is lookup:
            self._pending = None
        return lookup.result()

    def too_slow(self) -> LookupTimeout:
        return LookupTimeout(f"host lookup of {self.host}: no answer within "
                             f"{self.timeout:g} s")

    def addresses(self, deadline: float) -> Addresses:
        """The blocking wait: LookupTimeout when no answer came by the deadline."""
        lookup = self.future()
        try:
            lookup.result(max(deadline - clock.monotonic(), 0.0))
        except concurrent.futures.TimeoutError:
            raise self.too_slow() from None
        except socket.gaierror:
            pass  # raised by answered()
        return self.answered(lookup)

    def _run(self, lookup: concurrent.futures.Future[Addresses]) -> None:
        try:
            lookup.set_result(socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC,
                                                 socket.SOCK_STREAM))
        except socket.gaierror as exc:
            lookup.set_exception(exc)
        except Exception as exc:  # UnicodeError ...: still "no address"
            lookup.set_exception(socket.gaierror(socket.EAI_FAIL,
                                                 f"{type(exc).__name__}: {exc}"))


def host_lookup(endpoint: Endpoint, timeout: float) -> HostLookup | None:
    return (HostLookup(endpoint.host, endpoint.port, timeout)
            if endpoint.kind == "inet" else None)


def idle_connection_usable(sock: socket.socket, poller: select.poll, name: str,
                           endpoint: Endpoint) -> bool:
    """False (and logged) when the server closed or wrote to the idle
    connection: it is dropped before reuse, without costing an attempt."""
    if not poller.poll(0):
        return True
    try:
        early = sock.recv(RECV_CHUNK_BYTES, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except OSError:
        early = b""
    log_idle_drop(name, endpoint, early)
    return False


def log_idle_drop(name: str, endpoint: Endpoint, early: bytes) -> None:
    """Say why an idle connection is dropped: what the server sent on it
    (a warning: no memcached does that), or that it closed it."""
    if early:
        log.warning("database %s: unexpected data from %s on an idle connection: %r "
                    "-- connection dropped", name, endpoint, early[:40])
    else:
        log.debug("database %s: %s closed the idle connection", name, endpoint)


class _Connection:
    """A blocking socket held to each attempt's deadline, and work to do
    while the first reply is on its way (``while_waiting``)."""

    __slots__ = ("armed", "attempts", "deadline", "poller", "sock", "while_waiting")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.while_waiting: Callable[[], None] | None = None
        self.attempts: Attempts | None = None  # the attempt using the connection
        self.deadline = 0.0
        self.armed = -1.0  # the kernel timeout the socket has now (-1: none)
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        # Blocking mode, bounded by the kernel (SO_RCVTIMEO/SO_SNDTIMEO, see
        # _arm): a Python socket timeout adds a poll() before every send and
        # recv, each system call letting another thread take the GIL.
        sock.settimeout(None)

    def _arm(self) -> None:
        """Give the next blocking call the time left before the deadline.

        setsockopt() is a system call; skip it while the socket's timeout is
        within MEMCACHE_DEADLINE_SLACK_SECONDS of the time left (the usual
        case: a reply read right after its command was sent).
        """
        left = self.deadline - clock.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        if abs(self.armed - left) > MEMCACHE_DEADLINE_SLACK_SECONDS:
            # A zero timeval means "no timeout": at least 1 ms.
            seconds = max(left, 0.001)
            whole = int(seconds)
            value = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            self.armed = left

    def exchange(self, data: bytes) -> bytes:
        """Send a command; read until the core says its reply is complete."""
        attempts = self.attempts
        assert attempts is not None
        self._arm()
        sock = self.sock
        try:
            sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise TimeoutError("timed out") from None
        work = self.while_waiting
        if work is not None:
            # The command is sent: do the caller's work while the server
            # answers; the time it takes is not the server's, so the
            # attempt's deadline moves by as much.
            self.while_waiting = None
            started = clock.monotonic()
            try:
                work()
            finally:
                self.deadline += clock.monotonic() - started
        receive = attempts.receive
        while True:
            self._arm()
            try:
                data = sock.recv(RECV_CHUNK_BYTES)
            except BlockingIOError:  # SO_RCVTIMEO expired
                raise TimeoutError("timed out") from None
            reply = receive(data)
            if reply is not None:
                return reply


class _AtMostOnce:
    """Work that runs at most once, at the first call."""

    __slots__ = ("work",)

    def __init__(self, work: Callable[[], None]) -> None:
        self.work: Callable[[], None] | None = work

    def __call__(self) -> None:
        work, self.work = self.work, None
        if work is not None:
            work()


class WireSettings(TypedDict, total=False):
    """A wire's settings beside its endpoint (DriverBase's keywords)."""

    timeout: Required[float]
    max_try: Required[int]
    retry_pause: Required[float]
    line_size_limit: Required[int]
    data_size_limit: Required[int]
    name: str
    fallback: str


class DriverBase:
    """What both drivers of the memcache core keep beside their connection:
    the core (rules, attempts, trouble log) and the bounded host lookup.
    MemcacheWire (blocking, below) and memtable.awire.AsyncMemcacheWire
    (asyncio) add only the I/O."""

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
        self._lookup = host_lookup(endpoint, self.core.timeout)

    @property
    def writable(self) -> bool:
        """False while memcached is unavailable or refusing writes (from a
        failure until a command, or a write, succeeds): no moment to
        rewrite what went to the backup only."""
        return self.core.writable

    def answered_by_backup(self, count: int = 1) -> None:
        """Count operations the backup answered because a command failed
        (reported when the trouble ends)."""
        self.core.answered_by_backup(count)


class MemcacheWire(DriverBase):
    """One persistent connection to one memcached, with Postfix's retries.

    Every method raises ServerUnavailableError (connect, timeout, EOF, I/O,
    server-side failure) or ProtocolError (the last attempt's reply broke
    the protocol or a limit) when all attempts fail, and ValueError for
    invalid keys, flags or exptimes before any I/O.  Not thread-safe.

    ``fallback`` names what answers when memcached cannot (a table's
    backup): the log lines say so, and writes memcached refuses are not
    retried.
    """

    def __init__(self, endpoint: Endpoint, **settings: Unpack[WireSettings]) -> None:
        super().__init__(endpoint, **settings)
        self._conn: _Connection | None = None

    # -- public API --------------------------------------------------------

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        """(flags, value) for key, or None when memcached has no such item."""
        return self._run(self.core.get(key))

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, bytes]]:
        """The hits among keys, as {key: (flags, value)}.

        One ``get k1 k2 ...`` per MEMCACHE_GET_LINE_MAX_BYTES of keys; each
        such command has its own attempts, and any that fails for good
        raises (no partial result).
        """
        requests = self.core.get_many(keys)
        if len(requests) == 1:
            return self._run(requests[0])
        hits: dict[bytes, tuple[int, bytes]] = {}
        for request in requests:
            got: dict[bytes, tuple[int, bytes]] = self._run(request)
            hits.update(got)
        return hits

    def set(self, key: bytes, value: bytes, *, flags: int, exptime: int) -> None:
        """Store key = value; only a STORED reply counts as success."""
        self._run(self.core.set(key, value, flags, exptime))

    def set_many(self, items: Sequence[Item], *,
                 while_waiting: Callable[[], None] | None = None) -> None:
        """Store (key, value, flags, exptime) items, pipelined: all ``set``s
        in one write, then all replies, each of which must be STORED.

        Batches of MEMCACHE_PIPELINE_MAX_COMMANDS; a failed batch is retried
        whole (a set is idempotent).

        ``while_waiting``, when given, runs exactly once: after the first
        batch's commands are written and before its replies are awaited, so
        the caller's own I/O (a backup's synced commit) overlaps the round
        trip; when no command could be written, before set_many returns or
        raises.  Its time does not count against ``timeout``.  It must not
        raise (an exception it raises propagates as a bug).
        """
        requests = self.core.set_many(items)
        once = _AtMostOnce(while_waiting) if while_waiting is not None else None
        try:
            for request in requests:
                self._run(request, once)
        finally:
            if once is not None:
                once()

    def gets(self, key: bytes) -> tuple[int, bytes, int] | None:
        """(flags, value, cas unique) for key, or None when memcached has no
        such item; the cas unique changes whenever the item is written."""
        return self._run(self.core.gets(key))

    def delete_unchanged(self, key: bytes, cas: int) -> bool | None:
        """Remove key only if it is unchanged since the ``gets`` that gave
        ``cas``: True when removed, False when written meanwhile (EXISTS),
        None when gone (NOT_FOUND).  The text protocol has no guarded
        delete; a ``cas`` that stores an empty value with an expiration
        time in the past is one: memcached drops an expired item at its next
        access, and proxies (twemproxy) pass ``cas`` on."""
        return self._run(self.core.delete_unchanged(key, cas))

    def delete(self, key: bytes) -> bool:
        """Remove key: True when memcached said DELETED, False for NOT_FOUND."""
        return self._run(self.core.delete(key))

    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Remove keys, pipelined as set_many (DELETED and NOT_FOUND both
        count as done); a failed batch is sent again whole."""
        for request in self.core.delete_many(keys):
            self._run(request)

    def close(self) -> None:
        """Drop the connection (the next command opens a new one), and log
        the troubles not reported yet (a flapping server's)."""
        self._drop()
        self.core.close()

    def __enter__(self) -> MemcacheWire:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- attempts ------------------------------------------------------------

    def _run(self, request: Request[T], while_waiting: _AtMostOnce | None = None) -> T:
        core = self.core
        attempts = core.attempts(request)
        while (pause := attempts.next_attempt()) is not None:
            if pause:
                clock.sleep(pause)
            deadline = clock.monotonic() + core.timeout
            try:
                conn = self._connection(deadline)
            except OSError as exc:
                attempts.connect_failed(exc)
                break
            attempts.connected()
            conn.deadline = deadline
            conn.while_waiting = while_waiting  # a no-op once it has run
            conn.attempts = attempts
            try:
                result = core.perform(request, conn.exchange)
            except Exception as exc:
                self._drop()
                if not attempts.failed(exc):
                    raise
                continue
            except BaseException:
                self._drop()  # state unknown (KeyboardInterrupt): start afresh
                raise
            # (A connection that failed is dropped; on success, while_waiting has
            # run and the next attempt sets both again.)
            attempts.succeeded()
            return result
        raise attempts.give_up()

    def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None:
            if idle_connection_usable(conn.sock, conn.poller, self.name, self.endpoint):
                return conn
            self._drop()
        conn = self._conn = _Connection(self._connect(deadline))
        return conn

    def _connect(self, deadline: float) -> socket.socket:
        ep = self.endpoint
        if ep.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(deadline - clock.monotonic(), 0.001))
                sock.connect(ep.path)
            except BaseException:
                sock.close()
                raise
            return sock
        assert self._lookup is not None
        last: OSError = OSError(f"no address for {ep.host}")
        for family, type_, proto, _, addr in self._lookup.addresses(deadline):
            left = deadline - clock.monotonic()
            if left <= 0:
                raise TimeoutError("connect timed out")
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(left)
                sock.connect(addr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise last

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sock.close()

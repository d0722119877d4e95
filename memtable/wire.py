"""The memcache connection of a memcache: table, strict and bounded.

pymemcache frames the text protocol; MemcacheWire drives it with what
Postfix's dict_memcache adds (read from dict_memcache.c / auto_clnt.c):

- up to max_try attempts per command, retry_pause seconds apart, with the
  connection dropped and reopened after any failure;
- no further attempt once connecting fails (refused, no such socket, ...):
  Postfix's auto_clnt_access() returns no stream and the loop stops;
- a ``set`` counts only when the server says STORED;
- line_size_limit / data_size_limit on every reply (memtable.replyparse).

pymemcache reads through a guarded socket whose recv() feeds every chunk to
a ReplyGuard before pymemcache sees it, and which holds each attempt
(connect + command + reply) to one deadline of ``timeout`` seconds, so a
server dripping a byte at a time cannot stretch it.  pymemcache's noreply
mode is never used.

Differences from Postfix, all stricter: trailing bytes after a reply, a bare
LF line end or a VALUE for a key not asked for are protocol errors (Postfix
would keep the value); ``timeout = 0`` (no limit to Postfix) is bounded by
limits.MEMCACHE_UNLIMITED_TIMEOUT_SECONDS.  Like Postfix's event loop
(auto_clnt_event), an idle connection that the server closed or wrote to
is dropped before reuse, without costing an attempt.  A server that timed
out on every attempt, or whose host name could not be looked up, is "held
down": calls fail at once for limits.MEMCACHE_DOWN_HOLD_SECONDS, so a hung
(not dead) memcached costs one timeout per hold period rather than one per
call; callers with a backup answer from it meanwhile.

The host name is looked up at every new connection in a worker thread
(_HostLookup), within the attempt's deadline: getaddrinfo() cannot be
interrupted, and a DNS server that never answers would hold it for as long
as resolv.conf allows (30 s and more).  Any failure of the lookup is an
unavailable server, never another exception.

With a ``fallback`` (the table's backup), a write that memcached refuses
(``SERVER_ERROR out of memory ...``, NOT_STORED) is not retried: a full
memcached would otherwise cost every write ``retry_pause``, and the backup
has the value.  Without one, Postfix's retries apply.

Failures are logged once per trouble, not per command (memtable.outage);
the attempts themselves are logged at debug level.

Keys must already be valid memcache keys (1..250 bytes, no white space or
control characters: the table's key checks come first); anything else is a
ValueError, a caller bug, raised before any I/O.

A MemcacheWire is NOT thread-safe: use one per thread.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import select
import socket
import struct
import threading
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
)

from memtable import clock
from memtable.endpoint import Endpoint
from memtable.errors import ProtocolError, ServerUnavailableError
from memtable.limits import (
    MEMCACHE_DEADLINE_SLACK_SECONDS,
    MEMCACHE_DOWN_HOLD_SECONDS,
    MEMCACHE_GET_LINE_MAX_BYTES,
    MEMCACHE_PIPELINE_MAX_COMMANDS,
    MEMCACHE_UNLIMITED_TIMEOUT_SECONDS,
    MEMCACHED_MAX_KEY_BYTES,
    MEMCACHED_RELATIVE_TTL_MAX,
    RECV_CHUNK_BYTES,
)
from memtable.outage import OutageLog
from memtable.replyparse import Kind, ReplyGuard

log = logging.getLogger("memtable.wire")

T = TypeVar("T")

# memcached splits commands on white space and ends them at LF.
_BAD_KEY_BYTE: Final = re.compile(rb"[\x00-\x20\x7f]")
_FLAGS_MAX: Final = 2**32 - 1
# An absolute expiration time (over 30 days is a UNIX time) long past:
# an item stored with it is expired at once (delete_unchanged).
_EXPIRED: Final = MEMCACHED_RELATIVE_TTL_MAX + 1


class _AttemptFailed(Exception):
    """A reply that is valid but not success (NOT_STORED, SERVER_ERROR ...)."""

    def __init__(self, reason: str, protocol: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.protocol = protocol


class _ValueSerde:
    """Values stay bytes; a hit is (flags, value) so callers see the flags."""

    @staticmethod
    def serialize(key: bytes, value: bytes) -> tuple[bytes, int]:
        return value, 0

    @staticmethod
    def deserialize(key: bytes, value: bytes, flags: int) -> tuple[int, bytes]:
        return flags, value


class _Client(Client):  # type: ignore[misc]  # pymemcache has no type hints
    """pymemcache's Client with our socket and the caller's exact keys."""

    def check_key(self, key: Any, key_prefix: bytes) -> Any:
        # Keys were checked by MemcacheWire._check_key (and the table before).
        return key

    def _connect(self) -> None:
        # MemcacheWire installs the socket before every command.
        raise ConnectionError("memtable.wire: no connection installed")


class _Once:
    """Work that runs at most once, at the first call."""

    __slots__ = ("work",)

    def __init__(self, work: Callable[[], None]) -> None:
        self.work: Callable[[], None] | None = work

    def __call__(self) -> None:
        work, self.work = self.work, None
        if work is not None:
            work()


class _LookupTimeout(TimeoutError):
    """The resolver did not answer within the attempt's deadline."""


class _Lookup:
    """One getaddrinfo() call running in a worker thread."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: list[Any] = []
        self.error: Exception | None = None


class _HostLookup:
    """The addresses of one host:port, looked up within a deadline.

    The lookup runs in a daemon thread and the caller waits for it until
    its deadline; a lookup that outlives the wait stays in flight, and the
    next call waits for that same lookup instead of starting another, so at
    most one thread per connection target is ever stuck in the resolver.
    An IP address needs no resolver and is converted in the caller's thread.
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
        self._pending: _Lookup | None = None

    def addresses(self, deadline: float) -> list[Any]:
        """getaddrinfo()'s answer; _LookupTimeout when it did not come by
        the deadline, socket.gaierror for any failure of the lookup."""
        if self.numeric:
            return socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC,
                                      socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        lookup = self._pending
        if lookup is None:
            lookup = self._pending = _Lookup()
            threading.Thread(target=self._run, args=(lookup,), daemon=True,
                             name=f"memtable lookup {self.host}").start()
        if not lookup.done.wait(max(deadline - clock.monotonic(), 0.0)):
            raise _LookupTimeout(f"host lookup of {self.host}: no answer within "
                                 f"{self.timeout:g} s")
        self._pending = None
        if lookup.error is not None:
            raise lookup.error
        return lookup.result

    def _run(self, lookup: _Lookup) -> None:
        try:
            lookup.result = socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC,
                                               socket.SOCK_STREAM)
        except socket.gaierror as exc:
            lookup.error = exc
        except Exception as exc:  # UnicodeError ...: still "no address"
            lookup.error = socket.gaierror(socket.EAI_FAIL, f"{type(exc).__name__}: {exc}")
        finally:
            lookup.done.set()


class _GuardedSocket:
    """The socket pymemcache talks through: guard + per-attempt deadline,
    and work to do while the first reply is on its way (``meanwhile``)."""

    __slots__ = ("armed", "deadline", "guard", "meanwhile", "poller", "sock")

    def __init__(self, sock: socket.socket, guard: ReplyGuard) -> None:
        self.sock = sock
        self.guard = guard
        self.meanwhile: _Once | None = None
        self.deadline = 0.0
        self.armed = -1.0  # the kernel timeout the socket has now (-1: none)
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        # Blocking mode, bounded by the kernel (SO_RCVTIMEO/SO_SNDTIMEO, see
        # _arm): a Python socket timeout adds a poll() before every send and
        # recv, and each system call lets another thread take the GIL
        # (policyd's store worker then waits for the event loop).
        sock.settimeout(None)

    def _arm(self) -> None:
        """Give the next blocking call the time left before the deadline.

        setsockopt() is a system call; skip it while the socket's timeout is
        within MEMCACHE_DEADLINE_SLACK_SECONDS of the time left (the usual case: a
        reply read right after its command was sent).
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

    def sendall(self, data: bytes) -> None:
        self._arm()
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise TimeoutError("timed out") from None

    def recv(self, size: int) -> bytes:
        if self.meanwhile is not None:
            # The command is sent: do the caller's work while the server
            # answers; the time it takes is not the server's, so the
            # attempt's deadline moves by as much.
            work, self.meanwhile = self.meanwhile, None
            started = clock.monotonic()
            try:
                work()
            finally:
                self.deadline += clock.monotonic() - started
        self._arm()
        try:
            data = self.sock.recv(RECV_CHUNK_BYTES)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("timed out") from None
        if data:
            self.guard.feed(data)  # before pymemcache buffers anything
        return data

    def idle_readable(self) -> bool:
        """True when the server closed or wrote to the idle connection."""
        return bool(self.poller.poll(0))

    def close(self) -> None:
        self.sock.close()


class MemcacheWire:
    """One persistent connection to one memcached, with Postfix's retries.

    Every method raises ServerUnavailableError (connect, timeout, EOF, I/O,
    server-side failure) or ProtocolError (the last attempt's reply broke
    the protocol or a limit) when all attempts fail.  Not thread-safe.

    ``fallback`` names what answers when memcached cannot (a table's
    backup): the log lines say so, and writes memcached refuses are not
    retried.
    """

    def __init__(self, endpoint: Endpoint, *, timeout: float, max_try: int,
                 retry_pause: float, line_size_limit: int, data_size_limit: int,
                 name: str = "", fallback: str = "") -> None:
        if max_try < 1:
            raise ValueError(f"max_try must be at least 1, not {max_try}")
        if retry_pause < 0 or timeout < 0:
            raise ValueError("timeout and retry_pause must not be negative")
        self.endpoint = endpoint
        self.name = name or str(endpoint)
        self.timeout = float(timeout) if timeout > 0 else MEMCACHE_UNLIMITED_TIMEOUT_SECONDS
        self.max_try = max_try
        self.retry_pause = float(retry_pause)
        self.line_size_limit = line_size_limit
        self.data_size_limit = data_size_limit
        self._guard = ReplyGuard(line_size_limit, data_size_limit)
        server: Any = (endpoint.path if endpoint.kind == "unix"
                       else (endpoint.host, endpoint.port))
        self._client = _Client(server, serde=_ValueSerde(), default_noreply=False)
        self._conn: _GuardedSocket | None = None
        self._lookup = (_HostLookup(endpoint.host, endpoint.port, self.timeout)
                        if endpoint.kind == "inet" else None)
        self._down_until = 0.0  # monotonic time until which the server is held down
        self._down_reason = ""
        self.fallback = fallback
        subject = f"{endpoint} ({self.name})"
        self._outage = OutageLog(
            subject, trouble="unavailable", recovered="available again",
            fallback=f"answering from the backup {fallback}" if fallback else "")
        self._refusal = OutageLog(
            subject, trouble="refusing writes", recovered="taking writes again",
            fallback=f"writing to the backup {fallback} only" if fallback else "")

    @property
    def writable(self) -> bool:
        """False while memcached is unavailable or refusing writes (from a
        failure until a command, or a write, succeeds): no moment to
        rewrite what went to the backup only."""
        return not (self._outage.active or self._refusal.active)

    def answered_by_backup(self, count: int = 1) -> None:
        """Count operations the backup answered because a command failed
        (reported when the trouble ends)."""
        trouble = self._refusal if self._refusal.active else self._outage
        trouble.answered_by_backup(count)

    # -- public API --------------------------------------------------------

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        """(flags, value) for key, or None when memcached has no such item."""
        self._check_key(key)
        hit: tuple[int, bytes] | None = self._run(
            "get", lambda: self._client.get(key), keys=(key,))
        return hit

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, bytes]]:
        """The hits among keys, as {key: (flags, value)}.

        One ``get k1 k2 ...`` per MEMCACHE_GET_LINE_MAX_BYTES of keys; each
        such command has its own attempts, and any that fails for good
        raises (no partial result).
        """
        unique = list(dict.fromkeys(keys))
        for key in unique:
            self._check_key(key)
        hits: dict[bytes, tuple[int, bytes]] = {}
        for chunk in _chunks(unique):

            def attempt(chunk: list[bytes] = chunk) -> dict[bytes, tuple[int, bytes]]:
                got: dict[bytes, tuple[int, bytes]] = self._client.get_many(chunk)
                return got

            hits.update(self._run("get", attempt, keys=frozenset(chunk)))
        return hits

    def set(self, key: bytes, value: bytes, *, flags: int, exptime: int) -> None:
        """Store key = value; only a STORED reply counts as success."""
        self._check_key(key)
        self._check_item(value, flags, exptime)

        def attempt() -> None:
            if self._client.set(key, value, exptime, noreply=False, flags=flags) is not True:
                raise _AttemptFailed("update failed: NOT_STORED", protocol=False)

        self._run("storage", attempt)

    def set_many(self, items: Sequence[tuple[bytes, bytes, int, int]], *,
                 meanwhile: Callable[[], None] | None = None) -> None:
        """Store (key, value, flags, exptime) items, pipelined: all ``set``s
        in one write, then all replies, each of which must be STORED.

        Batches of MEMCACHE_PIPELINE_MAX_COMMANDS; a failed batch is retried
        whole (a set is idempotent).

        ``meanwhile``, when given, runs exactly once: after the first
        batch's commands are written and before its replies are awaited, so
        the caller's own I/O (a backup's synced commit) overlaps the round
        trip; when no command could be written, before set_many returns or
        raises.  Its time does not count against ``timeout``.  It must not
        raise (an exception it raises propagates as a bug).
        """
        commands = []
        for key, value, flags, exptime in items:
            self._check_key(key)
            self._check_item(value, flags, exptime)
            commands.append(b"set %b %d %d %d\r\n%b\r\n"
                            % (key, flags, exptime, len(value), value))
        once = _Once(meanwhile) if meanwhile is not None else None
        try:
            for start in range(0, len(commands), MEMCACHE_PIPELINE_MAX_COMMANDS):
                batch = commands[start:start + MEMCACHE_PIPELINE_MAX_COMMANDS]

                def attempt(batch: list[bytes] = batch) -> None:
                    conn = self._conn
                    if conn is not None and once is not None:
                        conn.meanwhile = once  # a no-op once it has run
                    try:
                        # pymemcache's own set_many takes one flags/expire for
                        # all items; _misc_cmd sends prepared commands and
                        # reads one reply line per command.
                        lines: list[bytes] = self._client._misc_cmd(batch, b"set", False)
                    finally:
                        if conn is not None:
                            conn.meanwhile = None
                    for line in lines:
                        if line != b"STORED":
                            raise _AttemptFailed(f"update failed: {line[:100]!r}",
                                                 protocol=False)

                self._run("storage", attempt, replies=len(batch))
        finally:
            if once is not None:
                once()

    def gets(self, key: bytes) -> tuple[int, bytes, int] | None:
        """(flags, value, cas unique) for key, or None when memcached has no
        such item; the cas unique changes whenever the item is written."""
        self._check_key(key)

        def attempt() -> tuple[int, bytes, int] | None:
            hit, cas = self._client.gets(key)
            if hit is None:
                return None
            flags, value = hit
            return flags, value, int(cas)

        found: tuple[int, bytes, int] | None = self._run("gets", attempt, keys=(key,))
        return found

    def delete_unchanged(self, key: bytes, cas: int) -> bool | None:
        """Remove key only if it is unchanged since the ``gets`` that gave
        ``cas``: True when removed, False when written meanwhile (EXISTS),
        None when gone (NOT_FOUND).  The text protocol has no guarded
        delete; a ``cas`` that stores an empty value with an expiration
        time in the past is one: memcached drops an expired item at its next
        access, and proxies (twemproxy) pass ``cas`` on."""
        self._check_key(key)

        def attempt() -> bool | None:
            done: bool | None = self._client.cas(key, b"", cas, expire=_EXPIRED, noreply=False,
                                                 flags=0)
            return done

        result: bool | None = self._run("cas", attempt)
        return result

    def delete(self, key: bytes) -> bool:
        """Remove key: True when memcached said DELETED, False for NOT_FOUND."""
        self._check_key(key)
        deleted: bool = self._run("delete", lambda: self._client.delete(key, noreply=False))
        return deleted

    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Remove keys, pipelined as set_many (DELETED and NOT_FOUND both
        count as done); a failed batch is sent again whole."""
        for key in keys:
            self._check_key(key)
        commands = [b"delete %b\r\n" % key for key in keys]
        for start in range(0, len(commands), MEMCACHE_PIPELINE_MAX_COMMANDS):
            batch = commands[start:start + MEMCACHE_PIPELINE_MAX_COMMANDS]

            def attempt(batch: list[bytes] = batch) -> None:
                self._client._misc_cmd(batch, b"delete", False)

            self._run("delete", attempt, replies=len(batch))

    def close(self) -> None:
        """Drop the connection (the next command opens a new one), and log
        the troubles not reported yet (a flapping server's)."""
        self._drop()
        self._outage.close()
        self._refusal.close()

    def __enter__(self) -> MemcacheWire:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- checks --------------------------------------------------------------

    @staticmethod
    def _check_key(key: bytes) -> None:
        if (not key or len(key) > MEMCACHED_MAX_KEY_BYTES
                or _BAD_KEY_BYTE.search(key) is not None):
            raise ValueError(f"not a valid memcache key: {key[:60]!r}")

    def _check_item(self, value: bytes, flags: int, exptime: int) -> None:
        if len(value) > self.data_size_limit:
            # Never store what our own get would refuse to read back.
            raise ValueError(f"value of {len(value)} bytes over "
                             f"data_size_limit={self.data_size_limit}")
        if not 0 <= flags <= _FLAGS_MAX:
            raise ValueError(f"flags {flags} out of range 0..{_FLAGS_MAX}")
        if not 0 <= exptime <= _FLAGS_MAX:
            raise ValueError(f"exptime {exptime} out of range 0..{_FLAGS_MAX}")

    # -- attempts ------------------------------------------------------------

    def _run(self, kind: Kind, op: Callable[[], T], *, replies: int = 1,
             keys: Collection[bytes] | None = None) -> T:
        if self._down_until:
            left = self._down_until - clock.monotonic()
            if left > 0:
                message = (f"held down for {left:.1f} s more after: {self._down_reason}")
                self._outage.failed(message)
                raise ServerUnavailableError(
                    f"memcache server {self.endpoint} ({self.name}): {message}")
        reason = "no attempt made"
        protocol = False
        hold = False      # hold the server down: timeout, failed host lookup
        refused = False   # memcached answered a write with a failure
        attempts = 0
        for count in range(self.max_try):
            if count > 0:
                clock.sleep(self.retry_pause)
            attempts += 1
            deadline = clock.monotonic() + self.timeout
            try:
                conn = self._connection(deadline)
            except OSError as exc:
                # Postfix: no stream from auto_clnt_access() ends the loop.
                reason, protocol = f"connect: {_oserror(exc)}", False
                hold = isinstance(exc, TimeoutError | socket.gaierror)
                log.debug("connect to %s: %s", self.endpoint, _oserror(exc))
                break
            conn.deadline = deadline
            conn.guard.start(kind, replies=replies, keys=keys)
            refused = hold = False
            try:
                result = op()
                if conn.guard.done:
                    self._outage.succeeded()
                    if kind == "storage":
                        self._refusal.succeeded()
                    return result
                reason, protocol = "reply not read to its end", True
            except ProtocolError as exc:
                reason, protocol = str(exc), True
            except _AttemptFailed as exc:
                reason, protocol = exc.reason, exc.protocol
                refused = kind == "storage" and not exc.protocol
            except MemcacheUnexpectedCloseError:
                reason, protocol = "connection closed by server", False
            except TimeoutError:
                reason, protocol = f"timeout after {self.timeout:g} s", False
                hold = True
            except MemcacheServerError as exc:
                reason, protocol = f"SERVER_ERROR {_text(exc)}", False
                refused = kind == "storage"
            except MemcacheUnknownCommandError:
                reason, protocol = f"server replied ERROR to {kind}", True
            except MemcacheClientError as exc:
                reason, protocol = f"CLIENT_ERROR {_text(exc)}", True
            except MemcacheError as exc:
                reason, protocol = f"unexpected reply: {_text(exc)}", True
            except OSError as exc:
                reason, protocol = f"I/O error: {_oserror(exc)}", False
            except BaseException:
                self._drop()  # state unknown (KeyboardInterrupt, bug): start afresh
                raise
            self._drop()
            if count > 0:
                # Postfix logs the retries' failures; memtable at debug level:
                # the trouble itself is logged once (memtable.outage).
                log.debug("database %s: %s (server %s, attempt %d of %d)",
                          self.name, reason, self.endpoint, count + 1, self.max_try)
            if refused and self.fallback:
                # A full memcached refuses the retry too; the backup has the
                # value (Postfix retries, paying retry_pause every time).
                break
        tried = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        if hold:
            # A server that accepts connections but does not answer (or a
            # resolver that does not) would cost every caller max_try x
            # timeout; fail fast for a while instead (Postfix has no such
            # hold-down).
            self._down_until = clock.monotonic() + MEMCACHE_DOWN_HOLD_SECONDS
            self._down_reason = f"{reason} ({tried})"
            self._outage.failed(f"{reason} ({tried}); held down for "
                                f"{MEMCACHE_DOWN_HOLD_SECONDS:g} s")
        else:
            self._down_until = 0.0
            if refused:
                self._outage.succeeded()  # it answered
                self._refusal.failed(f"{reason} ({tried})")
            else:
                self._outage.failed(f"{reason} ({tried})")
        what = ProtocolError if protocol else ServerUnavailableError
        raise what(f"memcache server {self.endpoint} ({self.name}): {reason} ({tried})")

    def _connection(self, deadline: float) -> _GuardedSocket:
        conn = self._conn
        if conn is not None:
            if not conn.idle_readable():
                return conn
            self._drop_idle(conn)
        sock = self._connect(deadline)
        conn = _GuardedSocket(sock, self._guard)
        self._conn = conn
        self._client.sock = conn
        return conn

    def _drop_idle(self, conn: _GuardedSocket) -> None:
        try:
            early = conn.sock.recv(RECV_CHUNK_BYTES, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except OSError:
            early = b""
        if early:
            log.warning("database %s: unexpected data from %s on an idle connection: %r "
                        "-- connection dropped", self.name, self.endpoint, early[:40])
        else:
            log.debug("database %s: %s closed the idle connection", self.name, self.endpoint)
        self._drop()

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
        self._client.sock = None
        if conn is not None:
            conn.close()


def _chunks(keys: list[bytes]) -> list[list[bytes]]:
    """Split keys so that each ``get k1 k2 ...\\r\\n`` stays under the bound."""
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = 5  # "get" + CRLF
    for key in keys:
        if current and size + 1 + len(key) > MEMCACHE_GET_LINE_MAX_BYTES:
            chunks.append(current)
            current, size = [], 5
        current.append(key)
        size += 1 + len(key)
    if current:
        chunks.append(current)
    return chunks


def _oserror(exc: OSError) -> str:
    if isinstance(exc, _LookupTimeout):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"host lookup failed: {exc.strerror or exc}"
    return exc.strerror or str(exc) or type(exc).__name__


def _text(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else ""
    if isinstance(arg, bytes):
        return arg.decode("ascii", "backslashreplace")[:100]
    return str(arg)[:100]

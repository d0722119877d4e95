"""The memcache core: every rule of a memcache connection, with no I/O.

Bytes in, results out, in the style of h11: the drivers (memtable.wire,
blocking; memtable.awire, asyncio) connect, send, receive and sleep; this
module decides everything else.

- Framing: pymemcache frames the commands and parses the replies (the
  project's framer), through a buffer socket given to it as its
  ``socket_module``.  Capture: its sendall() records the command bytes and
  its first recv() stops pymemcache (``_Captured``).  Replay: recv() serves
  a reply the ReplyGuard has already checked and found complete, so
  pymemcache never waits on a socket, never sees an oversized line or value,
  and none of its private names are used.  The blocking driver does both in
  one pass (the reply is fetched from the first recv(), see McCore.perform).
- The ReplyGuard (memtable.replyparse) sees every chunk received.
- The attempt rules of Postfix's dict_memcache (Attempts): max_try attempts
  retry_pause apart, no further attempt once connecting fails, the
  hold-down after timeouts and failed host lookups, refused writes not
  retried when a backup has them, the error classes and their messages,
  and the outage logging (memtable.outage).
- The key, flags and exptime checks: a ValueError before any I/O.

One McCore serves one connection, one operation at a time.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final, Generic, TypeVar

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
from memtable.keys import key_problem
from memtable.limits import (
    MEMCACHE_DOWN_HOLD_SECONDS,
    MEMCACHE_GET_LINE_MAX_BYTES,
    MEMCACHE_PIPELINE_MAX_COMMANDS,
    MEMCACHE_UNLIMITED_TIMEOUT_SECONDS,
    MEMCACHED_CAS_MAX,
    MEMCACHED_FLAGS_MAX,
    MEMCACHED_RELATIVE_TTL_MAX,
)
from memtable.outage import OutageLog
from memtable.replyparse import Kind, ReplyGuard

# The logger of the memcache connection, whichever driver runs it.
log = logging.getLogger("memtable.wire")

T = TypeVar("T")

# An absolute expiration time (over 30 days is a UNIX time) long past:
# an item stored with it is expired at once (delete_unchanged).
_EXPIRED: Final = MEMCACHED_RELATIVE_TTL_MAX + 1
# pymemcache "connects" its buffer socket to this UNIX path: no lookup.
_BUFFER_SERVER: Final = "/memtable-buffer"

Item = tuple[bytes, bytes, int, int]  # key, value, flags, exptime


class LookupTimeout(TimeoutError):
    """The resolver did not answer within the attempt's deadline."""


class AttemptFailed(Exception):
    """A reply that is valid but not success (NOT_STORED, EOF ...)."""

    def __init__(self, reason: str, protocol: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.protocol = protocol


class _Captured(BaseException):
    """pymemcache asked for a reply in capture mode: the command is framed.

    A BaseException, so pymemcache's ``except Exception`` (which closes its
    socket) lets it through and the buffer socket stays installed."""


class _BufferSocket:
    """The socket pymemcache talks to: capture or replay, never I/O.

    ``exchange`` None: capture (sendall() records, recv() stops
    pymemcache); otherwise recv() serves exchange(the bytes sent), a whole
    checked reply, once.
    """

    __slots__ = ("exchange", "sent")

    def __init__(self) -> None:
        self.sent = b""
        self.exchange: Callable[[bytes], bytes] | None = None

    def sendall(self, data: bytes) -> None:
        self.sent = data

    def recv(self, size: int) -> bytes:
        exchange = self.exchange
        if exchange is None:
            raise _Captured
        self.exchange = None
        # Served whole, even over ``size``: pymemcache only splits it.
        return exchange(self.sent)

    # What pymemcache's connect and close call on a socket.
    def settimeout(self, timeout: float | None) -> None:
        pass

    def connect(self, address: object) -> None:
        pass

    def close(self) -> None:
        pass


class _BufferSocketModule:
    """The ``socket_module`` pymemcache creates its sockets with."""

    AF_UNIX = socket.AF_UNIX
    SOCK_STREAM = socket.SOCK_STREAM

    def __init__(self, sock: _BufferSocket) -> None:
        self._sock = sock

    def socket(self, *args: object) -> _BufferSocket:
        return self._sock


class _ValueSerde:
    """Values stay bytes; a hit is (flags, value) so callers see the flags."""

    @staticmethod
    def serialize(key: bytes, value: bytes) -> tuple[bytes, int]:
        return value, 0

    @staticmethod
    def deserialize(key: bytes, value: bytes, flags: int) -> tuple[int, bytes]:
        return flags, value


class _Client(Client):  # type: ignore[misc]  # pymemcache has no type hints
    """pymemcache's Client on the buffer socket, with the caller's exact keys."""

    def check_key(self, key: Any, key_prefix: bytes) -> Any:
        # Keys were checked by McCore.check_key (and the table before).
        return key


class Request(Generic[T]):
    """One command (or one pipelined batch) and how to frame and parse it.

    ``calls`` are pymemcache calls, each framing its part of the command
    and parsing its part of the reply; ``lines`` how many reply lines each
    part has when there are several (storage replies: one line per item);
    ``finish`` makes the result of theirs.
    """

    __slots__ = ("calls", "finish", "keys", "kind", "lines", "replies")

    def __init__(self, kind: Kind, calls: Sequence[Callable[[], Any]],
                 finish: Callable[[list[Any]], T] | None, replies: int = 1,
                 keys: Collection[bytes] | None = None, lines: Sequence[int] = ()) -> None:
        self.kind = kind
        self.calls = calls
        self.finish = finish  # None: the one call's result is the result
        self.replies = replies
        self.keys = keys
        self.lines = lines


class McCore:
    """The rules of one memcache connection: requests, replies, attempts.

    Raises ValueError for invalid arguments (a caller bug); the attempts
    (Attempts) end in ServerUnavailableError or ProtocolError.  ``fallback``
    names what answers when memcached cannot (a table's backup): the log
    lines say so, and writes memcached refuses are not retried.
    """

    def __init__(self, endpoint: Endpoint, *, timeout: float, max_try: int,
                 retry_pause: float, line_size_limit: int, data_size_limit: int,
                 name: str = "", fallback: str = "",
                 down_hold_seconds: float = MEMCACHE_DOWN_HOLD_SECONDS,
                 unlimited_timeout: float = MEMCACHE_UNLIMITED_TIMEOUT_SECONDS,
                 pipeline_max_commands: int = MEMCACHE_PIPELINE_MAX_COMMANDS,
                 get_line_max_bytes: int = MEMCACHE_GET_LINE_MAX_BYTES) -> None:
        if max_try < 1:
            raise ValueError(f"max_try must be at least 1, not {max_try}")
        if retry_pause < 0 or timeout < 0:
            raise ValueError("timeout and retry_pause must not be negative")
        self.endpoint = endpoint
        self.name = name or str(endpoint)
        self.timeout = float(timeout) if timeout > 0 else unlimited_timeout
        self.max_try = max_try
        self.retry_pause = float(retry_pause)
        self.line_size_limit = line_size_limit
        self.data_size_limit = data_size_limit
        self.down_hold_seconds = down_hold_seconds
        self.pipeline_max_commands = pipeline_max_commands
        self.get_line_max_bytes = get_line_max_bytes
        self.guard = ReplyGuard(line_size_limit, data_size_limit)
        self._buffer = _BufferSocket()
        self._client = _Client(_BUFFER_SERVER, serde=_ValueSerde(), default_noreply=False,
                               socket_module=_BufferSocketModule(self._buffer))
        self.down_until = 0.0  # monotonic time until which the server is held down
        self.down_reason = ""
        self.fallback = fallback
        subject = f"{endpoint} ({self.name})"
        self.outage = OutageLog(
            subject, trouble="unavailable", recovered="available again",
            fallback=f"answering from the backup {fallback}" if fallback else "")
        self.refusal = OutageLog(
            subject, trouble="refusing writes", recovered="taking writes again",
            fallback=f"writing to the backup {fallback} only" if fallback else "")

    # -- state the drivers show -------------------------------------------

    @property
    def writable(self) -> bool:
        """False while memcached is unavailable or refusing writes."""
        return not (self.outage.active or self.refusal.active)

    def answered_by_backup(self, count: int = 1) -> None:
        trouble = self.refusal if self.refusal.active else self.outage
        trouble.answered_by_backup(count)

    def close(self) -> None:
        """Log the troubles not reported yet (a flapping server's)."""
        self.outage.close()
        self.refusal.close()

    # -- checks --------------------------------------------------------------

    @staticmethod
    def check_key(key: bytes) -> None:
        if key_problem(key) is not None:  # the table's own key rule, checked first
            raise ValueError(f"not a valid memcache key: {key[:60]!r}")

    def check_item(self, value: bytes, flags: int, exptime: int) -> None:
        if len(value) > self.data_size_limit:
            # Never store what our own get would refuse to read back.
            raise ValueError(f"value of {len(value)} bytes over "
                             f"data_size_limit={self.data_size_limit}")
        if not 0 <= flags <= MEMCACHED_FLAGS_MAX:
            raise ValueError(f"flags {flags} out of range 0..{MEMCACHED_FLAGS_MAX}")
        if not 0 <= exptime <= MEMCACHED_FLAGS_MAX:
            raise ValueError(f"exptime {exptime} out of range 0..{MEMCACHED_FLAGS_MAX}")

    # -- requests (checked: ValueError before any I/O) -------------------------

    def get(self, key: bytes) -> Request[tuple[int, bytes] | None]:
        """(flags, value) for key, or None."""
        self.check_key(key)
        client = self._client
        return Request("get", (lambda: client.get(key),), None, 1, (key,))

    def get_many(self, keys: Sequence[bytes]) -> list[Request[dict[bytes, tuple[int, bytes]]]]:
        """One ``get k1 k2 ...`` per get_line_max_bytes of keys (each is a
        request of its own, with its own attempts).  One key (the usual
        lookup) is the one request ``get k``, built without the
        deduplication and the line splitting."""
        get_many = self._client.get_many
        if len(keys) == 1:
            key = keys[0]
            self.check_key(key)
            return [Request("get", (functools.partial(get_many, [key]),), None, 1, (key,))]
        unique = list(dict.fromkeys(keys))
        for key in unique:
            self.check_key(key)
        return [Request("get", (functools.partial(get_many, chunk),), None, 1,
                        frozenset(chunk))
                for chunk in chunks(unique, self.get_line_max_bytes)]

    def set(self, key: bytes, value: bytes, flags: int, exptime: int) -> Request[None]:
        """Store key = value; only STORED is success."""
        self.check_key(key)
        self.check_item(value, flags, exptime)
        client = self._client
        return Request("storage",
                       (lambda: client.set(key, value, exptime, noreply=False, flags=flags),),
                       _stored)

    def set_many(self, items: Sequence[Item]) -> list[Request[None]]:
        """Pipelined batches of pipeline_max_commands ``set``s, each reply
        STORED.  pymemcache's set_many takes one flags and exptime for all
        its items: a batch is one set_many per (flags, exptime), all framed
        before the batch is sent in one write.  One item (the usual
        update) is a plain ``set`` request (McCore.set)."""
        if len(items) == 1:
            key, value, flags, exptime = items[0]
            return [self.set(key, value, flags, exptime)]
        latest: dict[bytes, Item] = {}
        for item in items:
            key, value, flags, exptime = item
            self.check_key(key)
            self.check_item(value, flags, exptime)
            # The last value of a key wins, as it would on the server.
            latest.pop(key, None)
            latest[key] = item
        unique = list(latest.values())
        step = self.pipeline_max_commands
        return [self._set_batch(unique[start:start + step])
                for start in range(0, len(unique), step)]

    def _set_batch(self, batch: list[Item]) -> Request[None]:
        groups: dict[tuple[int, int], dict[bytes, bytes]] = {}
        for key, value, flags, exptime in batch:
            groups.setdefault((flags, exptime), {})[key] = value
        set_many = self._client.set_many
        calls: list[Callable[[], Any]] = [
            functools.partial(set_many, values, exptime, noreply=False, flags=flags)
            for (flags, exptime), values in groups.items()]
        return Request("storage", calls, _all_stored, len(batch), None,
                       [len(values) for values in groups.values()])

    def gets(self, key: bytes) -> Request[tuple[int, bytes, int] | None]:
        """(flags, value, cas unique) for key, or None."""
        self.check_key(key)
        client = self._client
        return Request("gets", (lambda: client.gets(key),), _with_cas, 1, (key,))

    def delete_unchanged(self, key: bytes, cas: int) -> Request[bool | None]:
        """A ``cas`` of an empty value with an expiration time in the past:
        True when removed, False when written meanwhile, None when gone."""
        self.check_key(key)
        if not 0 <= cas <= MEMCACHED_CAS_MAX:
            raise ValueError(f"cas unique {cas} out of range 0..{MEMCACHED_CAS_MAX}")
        client = self._client
        return Request("cas", (lambda: client.cas(key, b"", cas, expire=_EXPIRED,
                                                  noreply=False, flags=0),), None)

    def delete(self, key: bytes) -> Request[bool]:
        """True for DELETED, False for NOT_FOUND."""
        self.check_key(key)
        client = self._client
        return Request("delete", (lambda: client.delete(key, noreply=False),), None)

    def delete_many(self, keys: Sequence[bytes]) -> list[Request[None]]:
        """Pipelined batches of ``delete``s (DELETED and NOT_FOUND both done)."""
        for key in keys:
            self.check_key(key)
        delete_many = self._client.delete_many
        step = self.pipeline_max_commands
        batches = [list(keys[start:start + step]) for start in range(0, len(keys), step)]
        return [Request("delete", (functools.partial(delete_many, batch, noreply=False),),
                        _nothing, len(batch))
                for batch in batches]

    # -- framing: capture and replay -------------------------------------------

    def capture(self, request: Request[Any]) -> bytes:
        """The bytes of the request's command(s), framed by pymemcache."""
        buffer = self._buffer
        buffer.exchange = None
        parts = []
        for call in request.calls:
            try:
                call()
            except _Captured:
                parts.append(buffer.sent)
            else:  # pragma: no cover - every call waits for a reply
                raise AssertionError("pymemcache did not read a reply")
        return b"".join(parts)

    def replay(self, request: Request[T], reply: bytes) -> T:
        """The result of a complete, checked reply, parsed by pymemcache."""
        return self.perform(request, lambda sent: reply)

    def perform(self, request: Request[T], exchange: Callable[[bytes], bytes]) -> T:
        """Frame the request, let ``exchange(command bytes)`` send it and
        return its whole checked reply, and parse that.  A single call
        does it in one pass of pymemcache; several (set_many with different
        flags or exptimes) are framed first, so the batch is one write."""
        buffer = self._buffer
        calls = request.calls
        if len(calls) == 1:
            buffer.exchange = exchange
            try:
                result = calls[0]()
            finally:
                buffer.exchange = None
            finish = request.finish
            return result if finish is None else finish([result])
        reply = exchange(self.capture(request))
        # Storage replies are one line each, so the reply splits by lines.
        lines = reply.split(b"\r\n")
        results = []
        start = 0
        for call, count in zip(calls, request.lines, strict=True):
            part = b"".join(line + b"\r\n" for line in lines[start:start + count])
            start += count
            buffer.exchange = functools.partial(_served, part)
            try:
                results.append(call())
            finally:
                buffer.exchange = None
        assert request.finish is not None
        return request.finish(results)

    # -- attempts ----------------------------------------------------------------

    def attempts(self, request: Request[Any]) -> Attempts:
        """The attempts at one request; ServerUnavailableError at once
        while the server is held down."""
        if self.down_until:
            left = self.down_until - clock.monotonic()
            if left > 0:
                message = f"held down for {left:.1f} s more after: {self.down_reason}"
                self.outage.failed(message)
                raise ServerUnavailableError(
                    f"memcache server {self.endpoint} ({self.name}): {message}")
        return Attempts(self, request)


# Attempts states.
READY: Final = "ready"          # another attempt may start (next_attempt)
CONNECTING: Final = "connecting"
EXCHANGING: Final = "exchanging"  # the command is being sent, the reply read
SUCCEEDED: Final = "succeeded"
GAVE_UP: Final = "gave up"


class Attempts:
    """Postfix's attempt loop at one request, as a state machine.

    The driver calls next_attempt() (the pause to sleep before the attempt,
    or None: no more attempts, call give_up()), then connected() or
    connect_failed(), then receive() with every chunk read until it returns
    the whole reply, which McCore parses, then succeeded(); any exception
    on the way goes to failed() (the connection is dropped by the driver).
    """

    __slots__ = ("_chunks", "core", "count", "hold", "protocol", "reason", "refused",
                 "request", "state")

    def __init__(self, core: McCore, request: Request[Any]) -> None:
        self.core = core
        self.request = request
        self.state = READY
        self.count = 0
        self.reason = "no attempt made"
        self.protocol = False
        self.hold = False      # hold the server down: timeout, failed host lookup
        self.refused = False   # memcached answered a write with a failure
        self._chunks: list[bytes] = []

    def next_attempt(self) -> float | None:
        """None when no further attempt is to be made; else the seconds
        to pause before it (0 before the first)."""
        if self.state != READY or self.count >= self.core.max_try:
            return None
        self.state = CONNECTING
        self.count += 1
        return self.core.retry_pause if self.count > 1 else 0.0

    def connect_failed(self, exc: OSError) -> None:
        """No connection: Postfix's auto_clnt_access() returned no stream,
        which ends the loop."""
        self.reason, self.protocol = f"connect: {oserror_text(exc)}", False
        self.hold = isinstance(exc, TimeoutError | socket.gaierror)
        log.debug("connect to %s: %s", self.core.endpoint, oserror_text(exc))
        self.state = GAVE_UP

    def connected(self) -> None:
        """The attempt's connection is open: the guard expects the reply."""
        request = self.request
        self.core.guard.start(request.kind, replies=request.replies, keys=request.keys)
        self._chunks = []
        self.refused = self.hold = False
        self.state = EXCHANGING

    def receive(self, data: bytes) -> bytes | None:
        """Check the next chunk read (b"": the server closed); the whole
        reply, checked, once it is complete (None until then)."""
        if not data:
            raise AttemptFailed("connection closed by server", protocol=False)
        guard = self.core.guard
        guard.feed(data)
        chunks = self._chunks
        if not guard.done:
            chunks.append(data)
            return None
        if not chunks:
            return data  # the usual case: the whole reply in one read
        chunks.append(data)
        return b"".join(chunks)

    def succeeded(self) -> None:
        core = self.core
        core.outage.succeeded()
        if self.request.kind == "storage":
            core.refusal.succeeded()
        self.state = SUCCEEDED

    def failed(self, exc: Exception) -> bool:
        """Account for an attempt that raised ``exc``; False when exc is no
        failure of the server (a bug: the driver re-raises it)."""
        kind = self.request.kind
        core = self.core
        refused = hold = False
        if isinstance(exc, ProtocolError):
            reason, protocol = str(exc), True
        elif isinstance(exc, AttemptFailed):
            reason, protocol = exc.reason, exc.protocol
            refused = kind == "storage" and not exc.protocol
        elif isinstance(exc, MemcacheUnexpectedCloseError):
            reason, protocol = "connection closed by server", False
        elif isinstance(exc, TimeoutError):
            reason, protocol = f"timeout after {core.timeout:g} s", False
            hold = True
        elif isinstance(exc, MemcacheServerError):
            reason, protocol = f"SERVER_ERROR {_text(exc)}", False
            refused = kind == "storage"
        elif isinstance(exc, MemcacheUnknownCommandError):
            reason, protocol = f"server replied ERROR to {kind}", True
        elif isinstance(exc, MemcacheClientError):
            reason, protocol = f"CLIENT_ERROR {_text(exc)}", True
        elif isinstance(exc, MemcacheError):
            reason, protocol = f"unexpected reply: {_text(exc)}", True
        elif isinstance(exc, OSError):
            reason, protocol = f"I/O error: {oserror_text(exc)}", False
        else:
            self.state = GAVE_UP
            return False
        self.reason, self.protocol, self.refused, self.hold = reason, protocol, refused, hold
        if self.count > 1:
            # Postfix logs the retries' failures; memtable at debug level:
            # the trouble itself is logged once (memtable.outage).
            log.debug("database %s: %s (server %s, attempt %d of %d)",
                      core.name, reason, core.endpoint, self.count, core.max_try)
        # A full memcached refuses the retry too; the backup has the value
        # (Postfix retries, paying retry_pause every time).
        self.state = GAVE_UP if refused and core.fallback else READY
        return True

    def give_up(self) -> Exception:
        """The error to raise after the last attempt (logged and accounted)."""
        core = self.core
        self.state = GAVE_UP
        tried = f"after {self.count} attempt{'s' if self.count != 1 else ''}"
        reason = self.reason
        if self.hold:
            # A server that accepts connections but does not answer (or a
            # resolver that does not) would cost every caller max_try x
            # timeout; fail fast for a while instead (Postfix has no such
            # hold-down).
            core.down_until = clock.monotonic() + core.down_hold_seconds
            core.down_reason = f"{reason} ({tried})"
            core.outage.failed(f"{reason} ({tried}); held down for "
                               f"{core.down_hold_seconds:g} s")
        else:
            core.down_until = 0.0
            if self.refused:
                core.outage.succeeded()  # it answered
                core.refusal.failed(f"{reason} ({tried})")
            else:
                core.outage.failed(f"{reason} ({tried})")
        what = ProtocolError if self.protocol else ServerUnavailableError
        return what(f"memcache server {core.endpoint} ({core.name}): {reason} ({tried})")


# -- results of pymemcache's calls -------------------------------------------------


def _stored(results: list[Any]) -> None:
    if results[0] is not True:
        raise AttemptFailed("update failed: NOT_STORED", protocol=False)


def _all_stored(results: list[Any]) -> None:
    if any(results):  # pymemcache's set_many: the keys not stored
        raise AttemptFailed("update failed: NOT_STORED", protocol=False)


def _with_cas(results: list[Any]) -> tuple[int, bytes, int] | None:
    hit, cas = results[0]
    if hit is None:
        return None
    flags, value = hit
    return flags, value, int(cas)


def _served(reply: bytes, sent: bytes) -> bytes:
    return reply


def _nothing(results: list[Any]) -> None:
    return None


# -- helpers ---------------------------------------------------------------------


def chunks(keys: list[bytes], line_max: int = MEMCACHE_GET_LINE_MAX_BYTES) -> list[list[bytes]]:
    """Split keys so that each ``get k1 k2 ...\\r\\n`` stays under line_max."""
    result: list[list[bytes]] = []
    current: list[bytes] = []
    size = 5  # "get" + CRLF
    for key in keys:
        if current and size + 1 + len(key) > line_max:
            result.append(current)
            current, size = [], 5
        current.append(key)
        size += 1 + len(key)
    if current:
        result.append(current)
    return result


def oserror_text(exc: OSError) -> str:
    """An OSError as the messages say it."""
    if isinstance(exc, LookupTimeout):
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
